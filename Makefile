# The two quickstart commands, `make demo` and `make test`, each install what is missing first.
VENV ?= .venv
EXTRAS ?= dev
TEST_EXTRAS ?= dev,dali,ffcv
BIN := $(VENV)/bin

.PHONY: install demo test bench bench-loss gpu-suite clean

install:
	@bash scripts/install.sh $(VENV) $(EXTRAS)

demo: install  ## SimCLR on the embedded dataset, then kNN evaluation (a few minutes on 2 CPU cores)
	$(BIN)/fastssl train --config configs/demo.yaml

test:  ## the whole test suite (CPU; GPU-only tests skip without a GPU), with DALI and FFCV installed
	@bash scripts/install.sh $(VENV) $(TEST_EXTRAS)
	$(BIN)/python -m pytest -q tests

bench: install  ## stage-by-stage throughput of the demo pipeline on this machine
	$(BIN)/python benchmarks/throughput.py --config configs/demo.yaml

bench-loss: install  ## the contrastive-loss benchmark (CPU sizes here; see benchmarks/gpu_suite.sh for GPU)
	$(BIN)/python benchmarks/loss.py

gpu-suite: install  ## every GPU check and benchmark in one go
	bash benchmarks/gpu_suite.sh

clean:
	rm -rf $(VENV) runs .pytest_cache

"""Every ```python block of the README runs as shown (documentation that cannot rot silently)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tiny_config, tmp_path, monkeypatch):
    if "backbone.pt" in BLOCKS[index]:
        # The export example loads what `fastssl export` wrote: make one from a real run.
        from fastssl.cli import main as cli_main
        from fastssl.train import train
        cfg = tiny_config(**{"train.epochs": 1, "model.backbone": "resnet18"})
        train(cfg)
        assert cli_main(["export", "--checkpoint", f"{cfg.run.dir}/checkpoints/last.pt",
                         "--out", str(tmp_path / "backbone.pt")]) == 0
    (tmp_path / "configs").symlink_to(README.parent / "configs")     # examples name configs/*.yaml as from the repo root
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})

"""`fastssl eval knn|linear` and `fastssl export` on a checkpoint of the tiny run; the kNN monitor."""
import json

import pytest
import torch
import torchvision

from fastssl.cli import main
from fastssl.eval import linear_probe, topk_accuracy
from fastssl.train import train


@pytest.fixture(scope="module")
def checkpoint(tiny_cache, tmp_path_factory):
    """One epoch of the tiny run (kNN monitor on), its last.pt."""
    from fastssl.config import load_config
    import conftest
    run = tmp_path_factory.mktemp("evalrun")
    values = {"data.cache_dir": str(tiny_cache), "data.workers": 0,
              **{f"data.{k}": v for k, v in conftest.TINY_DATA.items()},
              "augment.size": 16, "augment.crop_scale": [0.3, 1.0], "augment.blur_p": 0.0,
              "model.backbone": "resnet18", "model.proj_hidden_dim": 64, "model.proj_dim": 32,
              "optim.lr": 2.0, "optim.lr_scaling": "none", "optim.warmup_epochs": 0.5, "method.simclr.temperature": 0.2,
              "train.epochs": 2, "train.batch_size": 32, "train.device": "cpu", "eval.knn_k": 20,
              "eval.knn_every_epochs": 1, "run.dir": str(run)}
    results = train(load_config(None, values))
    return run, results


def test_knn_monitor_writes_metrics(checkpoint):
    run, results = checkpoint
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in lines if r["event"] == "knn"]
    assert [r["epoch"] for r in knn] == [1] and 0 <= knn[0]["knn_top1"] <= 100   # the end has its own eval
    assert lines[-1]["event"] == "eval"


def test_eval_knn_command_reproduces_the_final_evaluation(checkpoint, capsys):
    run, results = checkpoint
    assert main(["eval", "knn", "--checkpoint", str(run / "checkpoints" / "last.pt")]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"kNN top-1: {results['knn_top1']:.1f}% (k=20")


def test_eval_linear_command_beats_chance(checkpoint, capsys):
    run, _ = checkpoint
    assert main(["eval", "linear", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                 "eval.linear_epochs=30", "eval.linear_batch_size=64"]) == 0
    out = capsys.readouterr().out.strip()
    import re
    m = re.fullmatch(r"linear top-1: (\d+\.\d)% top-5: (\d+\.\d)% \(train top-1 (\d+\.\d)%, 30 epochs, "
                     r"epoch 2, step 10\)", out)
    assert m, out
    top1, top5, train_top1 = map(float, m.groups())
    assert train_top1 > 10.0 * 2 and top5 >= top1           # 10 classes: chance is 10%


def test_linear_probe_on_separable_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=gen) * 3
    y = torch.arange(200) % 4
    f = centres[y] + torch.randn(200, 8, generator=gen)
    r = linear_probe(f[:150], y[:150], f[150:], y[150:], epochs=20, lr=0.1, batch_size=32)
    assert r["top1"] > 90 and r["train_top1"] > 90 and r["top5"] == 100.0
    assert topk_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]), 1) == 50.0


def test_export_loads_into_torchvision_and_gives_identical_features(checkpoint, tmp_path, capsys):
    run, _ = checkpoint
    out = tmp_path / "backbone.pt"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--out", str(out)]) == 0
    assert "model.fc = torch.nn.Identity()" in capsys.readouterr().out
    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    from fastssl.eval.commands import load_for_eval
    from fastssl.methods import build_method as build_model
    cfg, state = load_for_eval(run / "checkpoints" / "last.pt")
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    ours = model.backbone          # same memory format as tv (channels_last would pick other conv kernels)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(tv.eval()(x), ours.eval()(x))


def test_export_small_stem(tiny_config, tmp_path):
    from fastssl.eval.commands import export_backbone
    from fastssl.methods import build_method as build_model
    cfg = tiny_config(**{"model.stem": "small"})
    state = {"model": build_model(cfg).state_dict()}
    export_backbone(cfg, state, tmp_path / "b.pt")
    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    tv.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    tv.maxpool = torch.nn.Identity()
    tv.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True), strict=True)


def test_eval_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "--checkpoint: no file at" in capsys.readouterr().err

"""What features know about the embedded dataset: kNN top-1 of the shape (the class) and of the
two nuisance factors the images draw from a 10-colour palette, the background's colour and the
shape's colour (read back from the pixels), for the random-init network (as initialised and with
its batch norm fitted to the training images) and for each checkpoint (as trained and with its
batch norm refitted).

    python benchmarks/knn_factors.py runs/demo_runs/simclr_seed0/checkpoints/last.pt ... [--out FILE]

The random-init network is the first checkpoint's method built from its config (train.seed), as
the trainer's `random-init` line is. Writes benchmarks/results/knn_factors_<device>.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import loss as loss_benchmark   # benchmarks/loss.py, beside this file: device name and git sha
from fastssl.data.embedded import PALETTE
from fastssl.eval.commands import (eval_loaders, eval_preprocess, features, load_for_eval, on_device,
                                   trained_backbone)
from fastssl.eval.knn import knn_accuracy, with_estimated_batch_norm
from fastssl.methods import build_method

ROOT = Path(__file__).resolve().parents[1]
FACTORS = ("shape", "background_colour", "shape_colour")


def palette_labels(images: torch.Tensor):
    """(background, shape) palette indices of uint8 images (N, 3, H, W): the background is the
    median of the border pixels, the shape the median of the pixels at least 90% as far from it as
    the farthest one (a lower bar takes in the edges, blended with the background); each goes to
    its nearest palette colour. Against the generator's draws: background 100%, shape 99.3% of the
    demo's 32-px images (tests/test_knn_factors.py checks the 16-px test images)."""
    x = images.float()
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)     # (N, 3, 4W)
    background = border.median(dim=2).values
    distance = (x - background[:, :, None, None]).abs().sum(1).flatten(1)                   # (N, H*W)
    far = distance >= 0.9 * distance.max(dim=1, keepdim=True).values
    shape = torch.stack([img.flatten(1)[:, mask].median(dim=1).values for img, mask in zip(x, far)])
    palette = torch.tensor(PALETTE, dtype=torch.float32)
    return torch.cdist(background, palette).argmin(1), torch.cdist(shape, palette).argmin(1)


def factor_labels(loader) -> torch.Tensor:
    """(N, 3): the shape (the class), background colour and shape colour of every image `loader`
    yields, in its order. They do not depend on the network, so they are read once per loader."""
    return torch.cat([torch.stack([y, *palette_labels(views[0])], dim=1) for views, y, _ in loader])


def knn_per_factor(cfg, backbone, loaders, labels) -> dict:
    """kNN top-1 of each factor on `backbone`'s centre-view features (`labels`: factor_labels of the
    train and val loaders)."""
    train_f, train_y, val_f, val_y = features(cfg, backbone, loaders, True)
    if not (torch.equal(train_y, labels[0][:, 0]) and torch.equal(val_y, labels[1][:, 0])):
        raise RuntimeError("the evaluation loaders yielded the images in another order than when their "
                           "colours were read")
    return {name: knn_accuracy(train_f, labels[0][:, i], val_f, labels[1][:, i], cfg.eval.knn_k,
                               cfg.eval.knn_temperature) for i, name in enumerate(FACTORS)}


def both_normalisations(name: str, cfg, backbone, loaders, labels, fitted_label: str) -> list:
    fitted = with_estimated_batch_norm(backbone, loaders[0], eval_preprocess(cfg))
    records = [dict(network=name, **knn_per_factor(cfg, backbone, loaders, labels)),
               dict(network=f"{name}, {fitted_label}", **knn_per_factor(cfg, fitted, loaders, labels))]
    for r in records:
        print(f"{r['network']:45s} " + "  ".join(f"{f.replace('_', ' ')} {r[f]:5.1f}%" for f in FACTORS), flush=True)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoints of runs on the embedded dataset")
    p.add_argument("--out", help="the JSON file (default benchmarks/results/knn_factors_<device>.json)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    missing = [c for c in args.checkpoints if not Path(c).is_file()]
    if missing:
        p.error(f"no checkpoint file at {', '.join(missing)}")
    records = []
    for i, checkpoint in enumerate(args.checkpoints):
        cfg, state = load_for_eval(checkpoint)
        if cfg.data.train:
            raise SystemExit(f"{checkpoint}: trained on {cfg.data.train}, not the embedded dataset whose "
                             f"palette this script reads")
        loaders = eval_loaders(cfg, "cpu")
        labels = [factor_labels(loader) for loader in loaders]
        if i == 0:
            initial = on_device(build_method(cfg).eval_backbone(), "cpu")
            records += both_normalisations("random-init", cfg, initial, loaders, labels, "batch norm fitted")
        trained = on_device(trained_backbone(cfg, state), "cpu")
        records += [dict(r, checkpoint=checkpoint) for r in
                    both_normalisations(cfg.method.name, cfg, trained, loaders, labels, "batch norm refitted")]
    device = loss_benchmark.device_slug("cpu")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"knn_factors_{device}.json"
    out.write_text(json.dumps({
        "benchmark": "knn_factors", "device": device, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git_sha": loss_benchmark.git_sha(), "command": " ".join(["python", "benchmarks/knn_factors.py", *argv]),
        "note": "kNN top-1 (%) of each factor: 10 shapes, 10 background colours, 10 shape colours",
        "records": records}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/knn_factors.py: the palette colours read back from the pixels match the generator's
draws, and the script records every factor for random-init and a checkpoint."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_DATA
from fastssl.data.embedded import PALETTE, SEED, SPLITS, dataset_name

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import knn_factors  # noqa: E402


def drawn_colours(split: str, index: int):
    """The (background, shape) palette indices draw_image drew for an image, replayed in its order:
    background colour and jitter, the ramp's direction and depth, then shape colours until one is
    far enough from the background."""
    rng = np.random.default_rng([SEED, SPLITS.index(split), index])
    background = rng.integers(len(PALETTE))
    base = PALETTE[background] + rng.integers(-20, 21, size=3)
    rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
    while True:
        shape = rng.integers(len(PALETTE))
        if np.abs(PALETTE[shape] + rng.integers(-20, 21, size=3) - base).sum() >= 150:
            return int(background), int(shape)


def test_palette_labels_match_the_generator(tiny_cache):
    root = tiny_cache / dataset_name(TINY_DATA["embedded_train_per_class"], TINY_DATA["embedded_val_per_class"],
                                     TINY_DATA["embedded_image_size"])
    paths = sorted(root.glob("*/*/*.jpg"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])
    background, shape = knn_factors.palette_labels(images)
    truth = torch.tensor([drawn_colours(p.parent.parent.name, int(p.stem)) for p in paths])
    assert len(paths) == 220 and len(set(truth[:, 0].tolist())) == len(PALETTE)
    assert (background == truth[:, 0]).float().mean() >= 0.97       # thin shapes blur at 16 px
    assert (shape == truth[:, 1]).float().mean() >= 0.9          # 99.3% of the demo's 32-px images
    assert (background != shape).float().mean() >= 0.9                # the generator keeps them apart


def test_records_every_factor_of_random_init_and_the_checkpoint(tiny_config, tmp_path):
    from fastssl.train import train
    cfg = tiny_config(**{"train.epochs": 1})
    train(cfg)
    out = tmp_path / "factors.json"
    checkpoint = str(Path(cfg.run.dir) / "checkpoints" / "last.pt")
    assert knn_factors.main([checkpoint, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["command"] == f"python benchmarks/knn_factors.py {checkpoint} --out {out}"
    networks = [r["network"] for r in record["records"]]
    assert networks == ["random-init", "random-init, batch norm fitted", "simclr", "simclr, batch norm refitted"]
    for r in record["records"]:
        assert all(0 <= r[f] <= 100 for f in knn_factors.FACTORS)
    assert record["records"][2]["checkpoint"] == checkpoint


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        knn_factors.main([str(tmp_path / "nowhere.pt")])
    assert f"no checkpoint file at {tmp_path / 'nowhere.pt'}" in capsys.readouterr().err

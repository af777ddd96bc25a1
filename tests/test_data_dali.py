"""What is specific to the `dali` loader (the cross-loader suite covers the shared contract): its
two decode modes agree, its pixels match the `torch` and `pil` loaders', resume and restart, the
decoder failure path, non-JPEG files (through PIL) and the GPU (mixed) decoder."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from fastssl.data import ImageFolderLoader, ViewCrop, ensure_embedded_dataset  # noqa: E402
from fastssl.data.dali_loader import AHEAD, DaliLoader  # noqa: E402
from fastssl.data.torch_decode import TorchDecodeLoader  # noqa: E402

# Multi-crop: a large and a small view of different sizes (the 16-px images are up- and downscaled).
VIEWS = [ViewCrop(16, (0.3, 1.0)), ViewCrop(8, (0.05, 0.3))]


def epoch(loader, e=0, start_batch=0):
    loader.set_epoch(e, start_batch)
    return list(loader)


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.fixture
def train_dir(tiny_cache):
    return ensure_embedded_dataset(str(tiny_cache), 16, 6, 16)[0]


def photo_folder(root: Path, n=16, width=192, height=144) -> Path:
    """JPEGs large enough that a crop is a real part of the image (ROI decoding reads part of it):
    smooth colour ramps, as in photos, plus noise, as in their textures."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    for i in range(n):
        ramps = np.stack([x, y, (x + y) / 2], axis=2) * rng.uniform(80, 255, 3)
        pixels = (ramps + rng.normal(0, 12, ramps.shape)).clip(0, 255).astype(np.uint8)
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i}.jpg", quality=90)
    return root


def test_decode_modes_agree(tmp_path):
    # per_view decodes each box plus a margin that covers the resize filter, so it gives the
    # pixels of `once` up to IDCT rounding (measured: equal here; mean 0.00, max 1 on ImageNet
    # photos). Without the margin the views' borders differ: mean 0.11 here.
    root, views = photo_folder(tmp_path), [ViewCrop(32, (0.2, 1.0)), ViewCrop(16, (0.05, 0.2))]
    once = epoch(DaliLoader(root, size=32, views=views, batch_size=8, seed=5, workers=0, decode="once"))
    per_view = epoch(DaliLoader(root, size=32, views=views, batch_size=8, seed=5, workers=0, decode="per_view"))
    assert len(once) == len(per_view) == 2
    for (views_a, labels_a, indices_a), (views_b, labels_b, indices_b) in zip(once, per_view):
        assert torch.equal(labels_a, labels_b) and torch.equal(indices_a, indices_b)
        for a, b, view in zip(views_a, views_b, views):
            assert a.shape == b.shape == (8, 3, view.size, view.size) and a.dtype == b.dtype == torch.uint8
            assert mean_abs_diff(a, b) < 0.05 and (a.int() - b.int()).abs().max() <= 2


def test_pixels_match_the_torch_and_pil_loaders(train_dir):
    # Same boxes. On the CPU DALI's views come from fastssl.data.resize: the torch loader's filter
    # of the box alone (crop, then resize), so the same pixels up to rounding (measured mean |diff|
    # 0.02 here, 0.000-0.001 on ImageNet photos at 224 px). PIL's resize also reads up to one
    # filter support beyond the box and rounds to 8 bits between its passes: 0.8-1.1 here, where a
    # view's border is a large share of its 16 or 8 px (the torch loader's too), 0.16-0.18 on the photos.
    kw = dict(size=16, views=VIEWS, batch_size=32, seed=5, workers=0)
    dali = epoch(DaliLoader(train_dir, **kw), e=1)
    torch_views = epoch(TorchDecodeLoader(train_dir, **kw), e=1)
    pil_loader = ImageFolderLoader(train_dir, **kw)
    pil, other = epoch(pil_loader, e=1), epoch(pil_loader, e=2)
    assert len(dali) == len(torch_views) == len(pil) == 5
    for (views_d, labels_d, indices_d), (views_t, _, _), (views_p, labels_p, indices_p), (views_o, _, _) in zip(
            dali, torch_views, pil, other):
        assert torch.equal(labels_d, labels_p) and torch.equal(indices_d, indices_p)
        for d, t, p, o in zip(views_d, views_t, views_p, views_o):
            assert d.shape == t.shape == p.shape
            assert mean_abs_diff(d, t) < 0.1
            assert mean_abs_diff(d, p) < 1.5
            assert mean_abs_diff(d, o) > 20      # the bounds tell different crops apart
    # Evaluation: the centre view.
    _, val_dir = ensure_embedded_dataset(str(Path(train_dir).parent.parent), 16, 6, 16)
    (d, labels_d, _), = list(DaliLoader(val_dir, size=12, batch_size=64, workers=0, train=False))
    (t, _, _), = list(TorchDecodeLoader(val_dir, size=12, batch_size=64, workers=0, train=False))
    (p, labels_p, _), = list(ImageFolderLoader(val_dir, size=12, batch_size=64, workers=0, train=False))
    assert torch.equal(labels_d, labels_p) and d[0].shape == t[0].shape == p[0].shape == (60, 3, 12, 12)
    assert mean_abs_diff(d[0], t[0]) < 0.1 and mean_abs_diff(d[0], p[0]) < 1.5


def test_resume_and_restart_give_the_uninterrupted_batches(train_dir):
    loader = DaliLoader(train_dir, size=12, batch_size=32, seed=1, workers=0)
    loader.set_epoch(2)
    batches = iter(loader)
    first = next(batches)
    kept = [v.clone() for v in first[0]]
    full = [first] + list(batches)
    # Outputs are DALI's buffers (DLPack, no copy): later runs must not write over them.
    assert all(torch.equal(v, k) for v, k in zip(first[0], kept))

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a[0] + [a[1], a[2]], b[0] + [b[1], b[2]]))

    loader.set_epoch(2, start_batch=3)
    assert len(loader) == 2
    rest = list(loader)
    assert len(rest) == 2 and all(same(a, b) for a, b in zip(rest, full[3:]))
    # An iteration abandoned with runs queued in DALI; a new iter() restarts the epoch.
    loader.set_epoch(2)
    abandoned = iter(loader)
    next(abandoned)
    again = list(loader)
    assert len(again) == 5 and all(same(a, b) for a, b in zip(again, full))
    assert not same(epoch(loader, e=3)[0], full[0])


def test_batches_read_in_place_are_held_until_ahead_more_are_collected(train_dir):
    # DALI reads each batch's file bytes where they are (no_copy): freed too early, they could be
    # overwritten while a run still reads them.
    loader = DaliLoader(train_dir, size=12, batch_size=32, seed=1, workers=0)
    loader.set_epoch(0)
    yielded = []
    for _, _, indices in loader:
        yielded.append(indices)
        held = [batch.indices for batch, _ in loader.collected]
        assert len(held) == min(len(yielded), AHEAD)
        assert all(torch.equal(h, y) for h, y in zip(held, yielded[-AHEAD:]))
        # the batch submitted ahead (DALI may be reading it) is kept too, until the epoch's end
        assert len(loader.fed) == (1 if len(yielded) < 5 else 0)
    assert len(yielded) == 5
    # An iteration abandoned with a run queued: its batch is released with the pipeline, not before.
    loader.set_epoch(1)
    abandoned = iter(loader)
    next(abandoned)
    assert len(loader.fed) == 1
    next(iter(loader))
    assert loader.pipe is not None and len(loader.fed) == 1 and len(loader.collected) == 1


def test_unknown_decode_mode_is_rejected(train_dir):
    with pytest.raises(ValueError, match="data.dali_decode"):
        DaliLoader(train_dir, size=12, batch_size=32, workers=0, decode="twice")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (DALI's mixed decoder)")
@pytest.mark.parametrize("decode", ["once", "per_view"])
def test_gpu_decoding_matches_the_cpu(train_dir, decode):
    gpu = epoch(DaliLoader(train_dir, size=16, views=VIEWS, batch_size=32, seed=5, workers=2, decode=decode,
                           device="cuda"))
    cpu = epoch(DaliLoader(train_dir, size=16, views=VIEWS, batch_size=32, seed=5, workers=0, decode=decode))
    assert len(gpu) == len(cpu) == 5
    for (views_g, labels_g, indices_g), (views_c, labels_c, indices_c) in zip(gpu, cpu):
        assert labels_g.is_cuda and torch.equal(labels_g.cpu(), labels_c) and torch.equal(indices_g.cpu(), indices_c)
        for g, c in zip(views_g, views_c):
            assert g.is_cuda and g.dtype == torch.uint8 and g.shape == c.shape
            # nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling: 5.1 levels on average
            # on an H100 with these small images; a view shifted by one pixel differs by 9.7 to 12.
            assert mean_abs_diff(g.cpu(), c) < 7.5


def test_other_formats_decode_as_pil_reads_them(tmp_path):
    # Alone, DALI drops alpha (PIL: over white) and cannot read GIF: non-JPEGs go through PIL.
    # Square: the evaluation centre box is then the whole image, for both loaders.
    pixels = np.random.default_rng(0).integers(0, 256, (24, 24, 4), dtype=np.uint8)
    pixels[:12, :, 3] = 0                        # the top half transparent: white
    for name, save in (("alpha", dict(format="PNG")), ("gif", dict(format="GIF"))):
        (tmp_path / name).mkdir()
        image = Image.fromarray(pixels, "RGBA")
        (image if name == "alpha" else image.convert("RGB")).save(tmp_path / name / "x.png", **save)
    (dali, labels, _), = list(DaliLoader(tmp_path, size=16, batch_size=2, workers=0, train=False))
    (pil, _, _), = list(ImageFolderLoader(tmp_path, size=16, batch_size=2, workers=0, train=False))
    assert labels.tolist() == [0, 1] and mean_abs_diff(dali[0], pil[0]) < 1.0
    assert (dali[0][0, :, :6] == 255).all()     # the transparent half is white

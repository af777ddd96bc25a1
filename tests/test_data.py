import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastssl.data import CLASSES, ImageFolderLoader, ViewCrop, ensure_embedded_dataset, load_rgb, scan_image_folder
from fastssl.data.badimages import image_format, image_problem
from fastssl.data.crops import crop_box_pixels, crop_boxes, sample_crop_params, view_boxes



def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.jpg")):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_embedded_dataset_is_deterministic_and_complete(tmp_path):
    a_train, a_val = ensure_embedded_dataset(str(tmp_path / "a"), 3, 2, 16, log=lambda *_: None)
    b_train, b_val = ensure_embedded_dataset(str(tmp_path / "b"), 3, 2, 16, log=lambda *_: None)
    assert digest(a_train) == digest(b_train) and digest(a_val) == digest(b_val)
    assert sorted(p.name for p in a_train.iterdir()) == sorted(CLASSES)
    assert len(list(a_train.rglob("*.jpg"))) == 3 * len(CLASSES)
    assert len(list(a_val.rglob("*.jpg"))) == 2 * len(CLASSES)
    assert digest(a_train) != digest(a_val)
    # A second call reuses the cache and leaves no temporary folders behind.
    ensure_embedded_dataset(str(tmp_path / "a"), 3, 2, 16, log=lambda *_: None)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".tmp")]


def test_embedded_images_vary_within_a_class(tiny_cache):
    train, _ = ensure_embedded_dataset(str(tiny_cache), 16, 6, 16)
    files = sorted((train / "disk").glob("*.jpg"))[:4]
    means = [np.asarray(Image.open(f), dtype=float).mean(axis=(0, 1)) for f in files]
    # colours are random per image: mean colours differ by more than JPEG noise
    assert min(np.abs(means[i] - means[j]).sum() for i in range(4) for j in range(i + 1, 4)) > 5


def test_scan_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        scan_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        scan_image_folder(tmp_path)


def test_labels_follow_sorted_folders(tiny_cache):
    train, _ = ensure_embedded_dataset(str(tiny_cache), 16, 6, 16)
    samples, classes = scan_image_folder(train)
    assert classes == sorted(CLASSES)
    assert all(Path(path).parent.name == classes[label] for path, label in samples)


def test_train_loader_batches(tiny_cache):
    train, _ = ensure_embedded_dataset(str(tiny_cache), 16, 6, 16)
    loader = ImageFolderLoader(train, size=12, batch_size=32, seed=3, scale=(0.3, 1.0), workers=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 160 // 32
    views, labels, indices = batches[0]
    assert len(views) == 2
    for v in views:
        assert v.shape == (32, 3, 12, 12) and v.dtype == torch.uint8
    assert not torch.equal(views[0], views[1])          # two independent crops
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < len(CLASSES)
    all_indices = torch.cat([b[2] for b in batches])
    assert len(set(all_indices.tolist())) == len(all_indices)   # each image at most once per epoch


def test_loader_is_reproducible_per_epoch_and_worker_count(tiny_cache):
    train, _ = ensure_embedded_dataset(str(tiny_cache), 16, 6, 16)

    def first_batch(epoch, workers, seed=0):
        loader = ImageFolderLoader(train, size=12, batch_size=16, seed=seed, workers=workers)
        loader.set_epoch(epoch)
        return next(iter(loader))

    a, b = first_batch(1, 0), first_batch(1, 2)
    assert torch.equal(a[2], b[2]) and torch.equal(a[0][0], b[0][0])    # same pixels with 0 or 2 workers
    c = first_batch(2, 0)
    assert not torch.equal(a[2], c[2])                                    # a new order each epoch
    assert not torch.equal(a[2], first_batch(1, 0, seed=1)[2])            # and per seed


def test_fewer_images_than_a_batch(tiny_cache):
    train, _ = ensure_embedded_dataset(str(tiny_cache), 16, 6, 16)
    with pytest.raises(ValueError, match=r"holds 160 images, fewer than one batch \(train.batch_size=512\)"):
        ImageFolderLoader(train, size=12, batch_size=512, workers=0)


def test_bad_and_unusual_images(tmp_path):
    folder = tmp_path / "cls"
    folder.mkdir()
    Image.new("L", (9, 7), 128).save(folder / "gray.jpg")
    Image.new("CMYK", (9, 7), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.new("RGBA", (9, 7), (255, 0, 0, 0)).save(folder / "alpha.png")
    for name in ("gray.jpg", "cmyk.jpg", "alpha.png"):
        img = load_rgb(str(folder / name))
        assert img.mode == "RGB" and img.size == (9, 7)
    assert load_rgb(str(folder / "alpha.png")).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    good = (folder / "gray.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg"):
        with pytest.raises(RuntimeError, match=f"cannot decode image .*{name}"):
            load_rgb(str(folder / name))


def test_crop_boxes_respect_scale_ratio_and_bounds():
    params = sample_crop_params(4000, (0.2, 0.6), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    boxes = crop_boxes(params, 400, 400)
    x0, y0, w, h = boxes.unbind(1)
    area = w * h / 400 ** 2
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 0.6 + 1e-5
    assert (w / h).min() >= 3 / 4 - 1e-5 and (w / h).max() <= 4 / 3 + 1e-5
    assert x0.min() >= 0 and y0.min() >= 0 and (x0 + w).max() <= 400 + 1e-4 and (y0 + h).max() <= 400 + 1e-4
    # boxes too large for a thin image are clamped to it
    thin = crop_boxes(params, 10, 400)
    assert thin[:, 3].max() <= 10 and (thin[:, 1] >= 0).all()


def test_view_boxes_are_the_per_view_formula_from_the_same_draws():
    # The loaders' workers draw all of an image's views at once; the boxes must be those of the
    # per-view functions (which the GPU augmentation also uses), to the pixel.
    rng = np.random.default_rng(0)
    for trial in range(300):
        views = [ViewCrop(224, tuple(sorted(rng.uniform(0.01, 1.0, 2))), tuple(sorted(rng.uniform(0.3, 3.0, 2))))
                 for _ in range(int(rng.choice([1, 2, 3, 12])))]
        height, width, seed = int(rng.integers(1, 4000)), int(rng.integers(1, 4000)), int(rng.integers(2**40))
        gen = torch.Generator().manual_seed(seed)
        expected = [crop_box_pixels(crop_boxes(sample_crop_params(1, v.scale, v.ratio, gen), height, width)[0])
                    for v in views]
        assert view_boxes(views, height, width, torch.Generator().manual_seed(seed)) == expected, trial


def test_quick_check_finds_cut_files_and_passes_whole_ones(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))

    def encoded(image, fmt, **args):
        buf = io.BytesIO()
        image.save(buf, fmt, **args)
        return buf.getvalue()

    # An EXIF thumbnail ends with its own end-of-image marker, before the main image's scans.
    thumb = encoded(photo.resize((16, 12)), "JPEG")
    exif = Image.Exif()
    exif[0x010E] = "a description"
    with_thumb = encoded(photo, "JPEG", exif=exif.tobytes() + thumb)
    whole = {"baseline": encoded(photo, "JPEG"), "progressive": encoded(photo, "JPEG", progressive=True),
             "thumbnail": with_thumb, "png": encoded(photo, "PNG"), "webp": encoded(photo, "WEBP"),
             "gif": encoded(photo.convert("P"), "GIF"), "bmp": encoded(photo, "BMP"), "tiff": encoded(photo, "TIFF")}
    for name, data in whole.items():
        assert image_problem(data) is None, name
    assert image_format(whole["webp"]) == "webp" and image_format(whole["tiff"]) == "tiff"
    for name in ("baseline", "progressive", "thumbnail"):
        data = whole[name]
        for cut in (len(data) // 8, len(data) // 2, len(data) - 3):
            assert "truncated JPEG" in image_problem(data[:cut]), (name, cut)
        assert image_problem(data + b"\x00" * 16) is None, name        # padding after the end marker
    headers_only = whole["baseline"][:whole["baseline"].find(b"\xff\xda")] + b"\xff\xd9"
    assert "truncated JPEG" in image_problem(headers_only)             # an end marker but no scan
    assert "truncated PNG" in image_problem(whole["png"][:-40])
    assert image_problem(b"") == "empty file"
    assert image_problem(b"<html>oops</html>").startswith("not an image")

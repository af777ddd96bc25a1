"""What is particular to the `ffcv` loader and `fastssl convert` (tests/test_loaders.py holds the
contract every loader keeps): the .beton and its sidecar, unreadable files at conversion, no
half-written files, our multi-view decoder's crops (the formula of fastssl.data.crops, a pure
function of (seed, epoch, index, view)), resume, the evaluation pass and `beton_for`.

Numba compiles FFCV's pipeline once per loader (seconds on a small CPU), so loaders and .beton
files are shared through module-scoped fixtures."""
import math
import os
from types import SimpleNamespace

import numba
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv")

from ffcv.reader import Reader  # noqa: E402

from fastssl.cli import main  # noqa: E402
from fastssl.data import CLASSES, ViewCrop, ensure_embedded_dataset, scan_image_folder  # noqa: E402
from fastssl.data.convert import ConvertError, FolderImages, convert, read_sidecar, sidecar_path  # noqa: E402
from fastssl.data.crops import crop_box_pixels, crop_boxes  # noqa: E402
from fastssl.data.ffcv_loader import FfcvLoader, beton_for, crop_box, crop_uniforms, epoch_key  # noqa: E402
from conftest import bad_image_folder, write_image  # noqa: E402

QUIET = dict(log=lambda *_: None, progress=False)


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


def coordinate_image(width=200, height=160, blue=128) -> Image.Image:
    """R = x and G = y exactly (widths and heights up to 256): a view's colours say where it was cut."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, blue)], axis=2).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny_split(tiny_cache):
    """(train, val) ImageFolders of the tiny embedded dataset: 160 and 60 16-px JPEGs, 10 classes."""
    return ensure_embedded_dataset(str(tiny_cache), 16, 6, 16)


@pytest.fixture(scope="module")
def train_beton(tiny_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("betons") / "train.beton"
    report = convert(tiny_split[0], out, workers=2, **QUIET)
    return out, report


@pytest.fixture(scope="module")
def train_loader(train_beton):
    return FfcvLoader(train_beton[0], size=12, batch_size=32, seed=3, workers=2)


def epoch(loader, e, start_batch=0, order=None):
    loader.set_epoch(e, start_batch, order)
    return list(loader)


# ---------------------------------------------------------------------------------------------
# fastssl convert

def test_convert_writes_the_beton_and_its_sidecar(train_beton, tiny_split):
    out, report = train_beton
    assert files_in(out.parent) == ["train.beton", "train.beton.json"]        # no temporary file left
    info = read_sidecar(out)
    samples, classes = scan_image_folder(tiny_split[0])
    assert info["classes"] == classes == sorted(CLASSES)
    assert [(os.path.join(info["source"], rel), label) for rel, label in info["samples"]] == \
        [(str(tiny_split[0].resolve() / os.path.relpath(p, tiny_split[0])), label) for p, label in samples]
    assert info["skipped"] == [] and report["images"] == 160 and report["bytes"] == out.stat().st_size
    assert info["options"]["write_mode"] == "jpg" and info["options"]["max_side"] == 512
    assert info["command"].startswith("fastssl convert ") and "--write-mode jpg" in info["command"]
    reader = Reader(str(out))
    assert reader.num_samples == 160
    assert reader.metadata["f1"].tolist() == [label for _, label in info["samples"]]   # the label field
    assert set(reader.metadata["f0"]["mode"].tolist()) == {0}                          # 0: JPEG


def test_unreadable_files_are_skipped_and_reported(tmp_path):
    reasons = bad_image_folder(tmp_path / "src", 3)
    lines = []
    report = convert(tmp_path / "src", tmp_path / "out.beton", on_bad_image="skip", workers=2,
                     log=lines.append, progress=False)
    assert report["images"] == 6
    assert {path: reason for path, reason in report["skipped"]}.keys() == reasons.keys()
    for path, reason in report["skipped"]:
        assert reasons[path] in reason
        assert any(line.strip().startswith(f"{path}: {reasons[path]}") for line in lines), lines
    info = read_sidecar(tmp_path / "out.beton")
    assert info["skipped"] == report["skipped"]
    assert sorted(rel for rel, _ in info["samples"]) == [f"{c}/{i}.jpg" for c in "ab" for i in range(3)]
    assert Reader(str(tmp_path / "out.beton")).num_samples == 6


def test_an_unreadable_file_stops_the_conversion_and_leaves_nothing(tmp_path):
    bad_image_folder(tmp_path / "src", 3)
    (tmp_path / "out").mkdir()
    named = r"cannot decode image .*a/3_truncated.jpg: truncated JPEG.*--on-bad-image skip"
    with pytest.raises(ConvertError, match=named):
        convert(tmp_path / "src", tmp_path / "out" / "x.beton", workers=2, **QUIET)
    assert files_in(tmp_path / "out") == []


def test_a_writer_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    for i in range(40):
        write_image(tmp_path / "src" / "c", f"{i:02d}.jpg", Image.new("RGB", (24, 24), (i, 0, 0)))
    read = FolderImages.__getitem__

    def fail_on_30(self, i):                 # a file that changed after the check, say
        if i == 30:
            raise OSError("disk on fire")
        return read(self, i)

    monkeypatch.setattr(FolderImages, "__getitem__", fail_on_30)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConvertError, match="a writer process failed: OSError: disk on fire"):
        convert(tmp_path / "src", tmp_path / "out" / "x.beton", workers=2, **QUIET)
    assert files_in(tmp_path / "out") == []


def test_existing_output_is_kept_unless_forced_and_max_side_is_applied(tmp_path):
    write_image(tmp_path / "src" / "c", "wide.png", Image.new("RGB", (100, 60), (200, 10, 10)))
    write_image(tmp_path / "src" / "c", "small.png", Image.new("RGB", (30, 50), (10, 200, 10)))
    out = tmp_path / "x.beton"
    convert(tmp_path / "src", out, max_side=40, write_mode="raw", workers=1, **QUIET)
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        convert(tmp_path / "src", out, max_side=20, workers=1, **QUIET)
    meta = Reader(str(out)).metadata["f0"]
    assert list(zip(meta["height"].tolist(), meta["width"].tolist())) == [(40, 24), (24, 40)]   # small, wide
    convert(tmp_path / "src", out, max_side=20, write_mode="raw", workers=1, force=True, **QUIET)
    meta = Reader(str(out)).metadata["f0"]
    assert list(zip(meta["height"].tolist(), meta["width"].tolist())) == [(20, 12), (12, 20)]
    assert read_sidecar(out)["options"]["max_side"] == 20


@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_raw_and_jpeg_files_load_with_their_colours(mode, tmp_path_factory):
    root = tmp_path_factory.mktemp(mode)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 210)}
    for name, rgb in colours.items():
        write_image(root / "src" / name, "0.png", Image.new("RGB", (30, 22), rgb))
    convert(root / "src", root / "x.beton", write_mode=mode, workers=1, **QUIET)
    assert set(Reader(str(root / "x.beton")).metadata["f0"]["mode"].tolist()) == {{"jpg": 0, "raw": 1}[mode]}
    load = FfcvLoader(root / "x.beton", size=8, batch_size=4, train=False, workers=1)
    (view,), labels, indices = next(iter(load))
    assert view.shape == (3, 3, 8, 8) and indices.tolist() == [0, 1, 2]
    for v, label in zip(view, labels.tolist()):
        expected = torch.tensor(colours[load.classes[label]], dtype=torch.float32)
        assert (v.float().mean((1, 2)) - expected).abs().max() <= (0.5 if mode == "raw" else 4), load.classes[label]


def test_the_cli_converts_and_reports_clear_errors(tmp_path, capsys):
    bad_image_folder(tmp_path / "src", 3)
    out = tmp_path / "x.beton"
    args = ["convert", str(tmp_path / "src"), str(out), "--workers", "1", "--write-mode", "raw", "--max-side", "16"]
    assert main(args) == 2                                                   # the bad files stop it
    assert "a/3_truncated.jpg: truncated JPEG" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--on-bad-image", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "6 images" in printed and "skipped 3 unreadable file(s)" in printed
    assert "a/4_empty.jpg: empty file" in printed
    assert read_sidecar(out)["options"] == {"max_side": 16, "write_mode": "raw", "jpeg_quality": 90,
                                            "compress_probability": 0.5, "on_bad_image": "skip"}
    assert main(args + ["--on-bad-image", "skip"]) == 2 and "pass --force" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "y.beton")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "nowhere" / "y.beton")]) == 2
    assert "output folder" in capsys.readouterr().err
    (tmp_path / "empty" / "c").mkdir(parents=True)
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "z.beton")]) == 2
    assert "holds no images" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# FfcvLoader

def test_crops_are_fixed_by_seed_epoch_and_index(train_loader, train_beton):
    first, again, other = epoch(train_loader, 1), epoch(train_loader, 1), epoch(train_loader, 2)
    assert len(first) == len(train_loader) == train_loader.batches_per_epoch() == 5
    for (va, la, ia), (vb, lb, ib) in zip(first, again):                  # the same epoch twice
        assert torch.equal(ia, ib) and torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(va, vb))
    labels = [label for _, label in read_sidecar(train_beton[0])["samples"]]
    for views, label, index in first:
        assert label.tolist() == [labels[i] for i in index.tolist()]
        assert not torch.equal(views[0], views[1])                          # two different crops

    def by_index(batches):
        return {i: (views[0][k], views[1][k]) for views, _, index in batches for k, i in enumerate(index.tolist())}

    a, b = by_index(first), by_index(other)
    assert [i for _, _, idx in first for i in idx.tolist()] != [i for _, _, idx in other for i in idx.tolist()]
    common = a.keys() & b.keys()
    # another epoch: other crops of the same images
    assert sum(not torch.equal(a[i][0], b[i][0]) for i in common) > 0.9 * len(common)
    # the crops follow the index, not its position in the epoch
    forward = by_index(epoch(train_loader, 1, order=torch.arange(160)))
    backward = by_index(epoch(train_loader, 1, order=torch.arange(160).flip(0)))
    assert forward.keys() == backward.keys() == a.keys() == set(range(160))
    assert all(torch.equal(forward[i][v], backward[i][v]) and torch.equal(forward[i][v], a[i][v])
               for i in range(160) for v in (0, 1))


def test_loaders_leave_numba_types_alone(train_loader, train_beton):
    """FFCV 1.0.2 marks numba's interned uint8[::1] type read-only (changing its hash) whenever a
    loader compiles its reader, which corrupts numba's tables keyed by that type; fastssl's loader
    module replaces that reader."""
    interned = numba.uint8[::1]                # the object numba hands out for writable uint8 vectors
    second = FfcvLoader(train_beton[0], size=8, batch_size=16, train=False, workers=1)
    assert interned.mutable and numba.uint8[::1] is interned
    assert len(list(second)) == 10 and len(epoch(train_loader, 0)) == 5


@pytest.mark.parametrize("train", [True, False])
def test_batches_kept_by_the_caller_stay_intact(train_beton, train):
    """FFCV writes each batch into one of 5 buffers it reuses (3 ahead + 2): the loader's batches
    are copies out of them (on the CPU, where no transfer to a device makes one), so a batch kept
    for 20 batches still holds what it held when it came."""
    load = FfcvLoader(train_beton[0], size=8, batch_size=8, seed=2, train=train, workers=1)
    kept = epoch(load, 1)
    assert len(kept) == 20
    load.set_epoch(1)
    for k, (views, labels, indices) in enumerate(load):      # the same batches, compared as they come
        kept_views, kept_labels, kept_indices = kept[k]
        assert torch.equal(kept_indices, indices) and torch.equal(kept_labels, labels)
        assert all(torch.equal(a, b) for a, b in zip(kept_views, views)), f"batch {k} changed"
    assert len({tuple(v[0].flatten()[:64].tolist()) for v, _, _ in kept}) == 20     # 20 different batches


def test_mid_epoch_resume_equals_the_rest_of_the_epoch(train_loader, train_beton):
    expected = epoch(train_loader, 4)[2:]
    resumed = FfcvLoader(train_beton[0], size=12, batch_size=32, seed=3, workers=1)   # a new process, say
    resumed.set_epoch(4, start_batch=2)
    assert len(resumed) == 3 and resumed.batches_per_epoch() == 5
    got = list(resumed)
    assert len(got) == len(expected) == 3
    for (va, la, ia), (vb, lb, ib) in zip(got, expected):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(va, vb))


def test_an_epoch_left_midway_stops_its_thread(train_loader):
    """FFCV's close() only asks its daemon thread to stop; one still decoding when Python exits
    aborts the process ("terminate called without an active exception")."""
    train_loader.set_epoch(5)
    batches = iter(train_loader)
    next(batches)
    thread = train_loader.iterator
    assert thread.is_alive()              # it works ahead
    batches.close()                       # the epoch is left midway (a `break`, an error)
    assert not thread.is_alive()
    assert len(epoch(train_loader, 5)) == 5     # the loader reads whole epochs afterwards


@pytest.fixture(scope="module")
def coordinate_beton(tmp_path_factory):
    """Raw (lossless) coordinate images of two sizes."""
    root = tmp_path_factory.mktemp("coords")
    for i in range(4):
        write_image(root / "src" / "c", f"{i}.png", coordinate_image(200, 160, blue=i))
        write_image(root / "src" / "d", f"{i}.png", coordinate_image(120, 250, blue=10 + i))
    convert(root / "src", root / "coords.beton", write_mode="raw", max_side=0, workers=1, **QUIET)
    return root / "coords.beton"


def test_multi_crop_views_are_the_reference_boxes(coordinate_beton):
    """Every view of every image, in views of two sizes, is the box crop_box gives for (seed,
    epoch, index, view): the centre of its colours is the box's centre (area resampling keeps it,
    up to uint8 rounding: 0.5), and crop_box is fastssl.data.crops' formula."""
    views = [ViewCrop(16, (0.3, 1.0)), ViewCrop(16, (0.3, 1.0)), ViewCrop(8, (0.05, 0.3), (0.5, 2.0))]
    load = FfcvLoader(coordinate_beton, size=16, batch_size=4, seed=7, views=views, workers=2)
    sizes = {0: (160, 200), 1: (250, 120)}
    for e in (0, 5):
        key = epoch_key(7, e)
        load.set_epoch(e)
        batches = list(load)
        assert len(batches) == 2
        for got, labels, indices in batches:
            assert [tuple(v.shape) for v in got] == [(4, 3, 16, 16), (4, 3, 16, 16), (4, 3, 8, 8)]
            for k, (index, label) in enumerate(zip(indices.tolist(), labels.tolist())):
                height, width = sizes[label]
                assert got[0][k, 2, 0, 0].item() == (index % 4) + 10 * label     # the image of its index
                for v, view in enumerate(views):
                    lr = (math.log(view.ratio[0]), math.log(view.ratio[1]))
                    top, bottom, left, right = crop_box(key, index, v, height, width, *view.scale, *lr)
                    centre = got[v][k, :2].double().mean((1, 2))
                    assert abs(centre[0] - (left + right - 1) / 2) <= 0.5 + 1e-6, (e, index, v)
                    assert abs(centre[1] - (top + bottom - 1) / 2) <= 0.5 + 1e-6, (e, index, v)
                    # the formula: fastssl.data.crops on the same draws (float32 there: a pixel of rounding)
                    u = torch.tensor(crop_uniforms(key, index, v), dtype=torch.float32)
                    params = torch.stack([view.scale[0] + (view.scale[1] - view.scale[0]) * u[0],
                                          lr[0] + (lr[1] - lr[0]) * u[1], u[2], u[3]])[None]
                    ref = crop_box_pixels(crop_boxes(params, height, width)[0])
                    assert np.abs(np.subtract((left, top, min(right, width), min(bottom, height)),
                                              (ref[0], ref[1], min(ref[2], width), min(ref[3], height)))).max() <= 1


def test_evaluation_covers_every_index_once_with_centre_views(tiny_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("val") / "val.beton"
    convert(tiny_split[1], out, write_mode="raw", workers=1, **QUIET)
    shards = []
    for rank in range(2):
        load = FfcvLoader(out, size=16, batch_size=16, train=False, rank=rank, world_size=2, workers=1)
        batches = list(load)
        assert [len(b[2]) for b in batches] == [16, 14] and len(load) == load.batches_per_epoch() == 2
        indices = torch.cat([b[2] for b in batches]).tolist()
        assert indices == list(range(rank, 60, 2))                       # rank r: r, r + 2, ..., in order
        shards += indices
        if rank == 0:                   # 16-px squares at 16 px: the centre view is the whole image
            (view,), _, index = batches[0]
            pixels = np.array(Image.open(load.samples[index[3]][0]).convert("RGB"))
            assert torch.equal(view[3], torch.from_numpy(pixels).permute(2, 0, 1))
    assert sorted(shards) == list(range(60))


def test_quasi_random_order_is_seeded_and_resumable(train_beton):
    with pytest.raises(ValueError, match="one process only"):
        FfcvLoader(train_beton[0], size=8, batch_size=8, order="quasi_random", rank=0, world_size=2)
    load = FfcvLoader(train_beton[0], size=8, batch_size=32, seed=1, order="quasi_random", workers=1)
    load.set_epoch(3)
    whole = load.sampler_sequence()
    assert len(whole) == 160 and sorted(whole.tolist()) == list(range(160))
    assert np.array_equal(load.quasi_permutation(3), load.quasi_permutation(3))   # FFCV's own would differ
    load.set_epoch(3, start_batch=2)
    assert np.array_equal(load.sampler_sequence(), whole[64:])
    load.set_epoch(4)
    assert not np.array_equal(load.sampler_sequence(), whole)
    load.set_epoch(3, order=torch.arange(160))          # a method's order replaces the permutation
    assert load.sampler_sequence().tolist() == list(range(160))


def test_beton_for_reads_betons_converts_the_embedded_dataset_and_refuses_folders(tiny_cache, train_beton, tmp_path,
                                                                                   caplog):
    cfg = SimpleNamespace(cache_dir=str(tiny_cache), workers=1)
    assert beton_for(train_beton[0], cfg) == train_beton[0]
    with pytest.raises(FileNotFoundError, match="FFCV dataset not found"):
        beton_for(tmp_path / "missing.beton", cfg)
    val = ensure_embedded_dataset(str(tiny_cache), 16, 6, 16)[1]
    with caplog.at_level("INFO", logger="fastssl.data"):
        beton = beton_for(val, cfg)
    assert beton == val.with_suffix(".beton") and sidecar_path(beton).is_file()
    assert "converting the embedded dataset" in caplog.text
    assert read_sidecar(beton)["options"]["write_mode"] == "raw" and Reader(str(beton)).num_samples == 60
    stamp = beton.stat().st_mtime_ns
    assert beton_for(val, cfg) == beton and beton.stat().st_mtime_ns == stamp      # converted once
    write_image(tmp_path / "folder" / "c", "0.jpg", Image.new("RGB", (8, 8)))
    for folder, cache in ((tmp_path / "folder", str(tiny_cache)), (val, "")):
        with pytest.raises(ValueError, match=r"reads FFCV .beton files.*fastssl convert"):
            beton_for(folder, SimpleNamespace(cache_dir=cache, workers=1))


def test_loader_errors_are_clear(train_beton, tmp_path):
    with pytest.raises(ValueError, match=r"holds 160 images, fewer than one batch \(train.batch_size=256\)"):
        FfcvLoader(train_beton[0], size=8, batch_size=128, world_size=2)
    with pytest.raises(ValueError, match="data.ffcv_order"):
        FfcvLoader(train_beton[0], size=8, batch_size=8, order="sequential")
    lone = tmp_path / "lone.beton"
    lone.write_bytes(train_beton[0].read_bytes())
    with pytest.raises(FileNotFoundError, match="lone.beton.json not found"):
        FfcvLoader(lone, size=8, batch_size=8)

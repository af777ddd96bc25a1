"""The contract every loader keeps (pil, torch, dali, ffcv), checked on each of them: the batches,
the crops, the labels, the sharding and the unreadable files. DALI runs its CPU pipeline here."""
import importlib.util
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastssl.data import ViewCrop, build_loader, ensure_embedded_dataset
from fastssl.data.badimages import SkippedImages
from conftest import bad_image_folder, write_image

HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
HAVE_FFCV = importlib.util.find_spec("ffcv") is not None
FOLDER_KINDS = ["pil", "torch", pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="no DALI"))]
# ffcv reads a .beton converted from the folder (its unreadable files are the converter's:
# tests/test_data_ffcv.py)
KINDS = FOLDER_KINDS + [pytest.param("ffcv", marks=pytest.mark.skipif(not HAVE_FFCV, reason="no FFCV"))]
DECODER_KINDS = FOLDER_KINDS + [pytest.param("dali-per_view", marks=pytest.mark.skipif(not HAVE_DALI, reason="no DALI"))]


def data_config(kind, on_bad_image="error", **extra):
    """`kind`: a data.loader, or `dali-per_view` (DALI with ROI decoding per view)."""
    kind, _, decode = kind.partition("-")
    values = dict(loader=kind, workers=0 if kind in ("pil", "torch") else 1, on_bad_image=on_bad_image,
                  dali_decode=decode or "once", ffcv_order="random", ffcv_os_cache=True, cache_dir="")
    values.update(extra)
    return SimpleNamespace(**values)


def loader(kind, root, on_bad_image="error", skipped=None, **kwargs):
    kwargs.setdefault("size", 16)
    kwargs.setdefault("batch_size", 8)
    if kind == "ffcv":
        root = as_beton(root)
    return build_loader(data_config(kind, on_bad_image), str(root), skipped=skipped, **kwargs)


def as_beton(folder):
    """The folder converted once (raw pixels: lossless, as the folder loaders decode them)."""
    from fastssl.data.convert import convert
    beton = folder.parent / f"{folder.name}.beton"
    if not beton.exists():
        convert(folder, beton, write_mode="raw", workers=1, log=lambda *_: None, progress=False)
    return beton


def coordinate_image(width=200, height=160) -> Image.Image:
    """R grows with x and G with y from 0 to 255: a view's colour range tells where it was cut."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=2).round().astype(np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return ensure_embedded_dataset(str(cache), 16, 6, 16, log=lambda *_: None)


@pytest.mark.parametrize("kind", KINDS)
def test_batches_views_and_labels(kind, tiny):
    train, _ = tiny
    load = loader(kind, train, size=12, batch_size=32, seed=3, scale=(0.3, 1.0))
    load.set_epoch(0)
    batches = list(load)
    assert len(batches) == len(load) == load.batches_per_epoch() == 160 // 32
    seen = []
    for views, labels, indices in batches:
        assert len(views) == 2
        for v in views:
            assert v.shape == (32, 3, 12, 12) and v.dtype == torch.uint8 and v.device.type == "cpu"
            assert 20 < v.float().mean() < 235 and v.float().std() > 5      # real pixels, not a blank
        assert not torch.equal(views[0], views[1])                        # two independent crops
        assert labels.dtype == indices.dtype == torch.int64
        # labels are the class folders of the images
        assert labels.tolist() == [load.classes.index(load.samples[i][0].split("/")[-2]) for i in indices.tolist()]
        seen += indices.tolist()
    assert len(set(seen)) == len(seen) == 160                              # each image once per epoch


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_loader_visits_every_image_once_in_order(kind, tiny):
    _, val = tiny
    load = loader(kind, val, size=12, batch_size=16, train=False)
    batches = list(load)
    indices = torch.cat([b[2] for b in batches])
    assert indices.tolist() == list(range(60))                             # no drop_last, index order
    assert all(len(b[0]) == 1 and b[0][0].shape[1:] == (3, 12, 12) for b in batches)


@pytest.mark.parametrize("kind", KINDS)
def test_crops_follow_the_configured_scale_and_ratio(kind, tmp_path):
    for i in range(8):
        write_image(tmp_path / "grid", f"{i}.jpg", coordinate_image(), quality=100)
    scale, ratio, size = (0.25, 0.5), (3 / 4, 4 / 3), 32
    load = loader(kind, tmp_path, size=size, batch_size=8, scale=scale, ratio=ratio)
    areas, ratios = [], []
    for epoch in range(4):
        load.set_epoch(epoch)
        for views, _, _ in load:
            for view in views:
                v = view.float()
                # extent of the crop from its colour range; the centres of the S output pixels
                # span (S - 1) / S of the box
                w = (v[:, 0].amax((1, 2)) - v[:, 0].amin((1, 2))) / 255 * 199 * size / (size - 1) + 1
                h = (v[:, 1].amax((1, 2)) - v[:, 1].amin((1, 2))) / 255 * 159 * size / (size - 1) + 1
                areas += (w * h / (200 * 160)).tolist()
                ratios += (w / h).tolist()
    areas, ratios = np.array(areas), np.array(ratios)
    assert len(areas) == 4 * 8 * 2
    assert areas.min() > scale[0] * 0.9 and areas.max() < scale[1] * 1.1
    assert ratios.min() > ratio[0] * 0.93 and ratios.max() < ratio[1] * 1.07
    # and the draws spread over the ranges rather than sitting at one crop
    assert areas.min() < 0.3 and areas.max() > 0.42 and ratios.min() < 0.85 and ratios.max() > 1.15


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_each_epoch_without_overlap(kind, world, tiny):
    train, _ = tiny
    per_rank = 8
    global_batch = per_rank * world
    epochs = []
    for epoch in range(2):
        shards = []
        for rank in range(world):
            load = loader(kind, train, size=8, batch_size=per_rank, seed=5, rank=rank, world_size=world)
            load.set_epoch(epoch)
            shards.append([b[2].tolist() for b in load])
        # the k-th batches of all ranks together are the k-th global batch: disjoint, whole
        used = [i for shard in shards for batch in shard for i in batch]
        assert len(used) == len(set(used)) == (160 // global_batch) * global_batch
        assert all(len(batch) == per_rank for shard in shards for batch in shard)
        epochs.append(shards)
    assert epochs[0] != epochs[1]                                # a new order every epoch
    again = loader(kind, train, size=8, batch_size=per_rank, seed=5, rank=1, world_size=world)
    again.set_epoch(1)
    assert [b[2].tolist() for b in again] == epochs[1][1]        # and the same from the same seed


@pytest.mark.parametrize("kind", KINDS)
def test_mid_epoch_resume_continues_at_the_right_batch(kind, tiny):
    train, _ = tiny
    whole = loader(kind, train, size=12, batch_size=16, seed=2)
    whole.set_epoch(1)
    expected = list(whole)[3:]
    resumed = loader(kind, train, size=12, batch_size=16, seed=2)
    resumed.set_epoch(1, start_batch=3)
    got = list(resumed)
    assert len(got) == len(resumed) == len(expected)
    for (va, la, ia), (vb, lb, ib) in zip(got, expected):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
        assert all(torch.equal(a, b) for a, b in zip(va, vb))


@pytest.mark.parametrize("kind", KINDS)
def test_multi_crop_views_of_two_sizes(kind, tiny):
    train, _ = tiny
    views = [ViewCrop(16, (0.4, 1.0)), ViewCrop(16, (0.4, 1.0)), ViewCrop(8, (0.05, 0.4))]
    got, _, _ = next(iter(loader(kind, train, views=views)))
    assert [tuple(v.shape) for v in got] == [(8, 3, 16, 16), (8, 3, 16, 16), (8, 3, 8, 8)]


@pytest.fixture(scope="module")
def unusual(tmp_path_factory):
    """An ImageFolder of images that must decode: grayscale, CMYK and PNG-with-alpha files,
    a PNG named .jpg, a 10,000 x 10,000 JPEG, and a text file that is ignored."""
    root = tmp_path_factory.mktemp("unusual")
    write_image(root / "gray", "gray.jpg", Image.new("L", (40, 30), 128), quality=95)
    write_image(root / "cmyk", "cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 0, 0)), quality=95)
    write_image(root / "alpha", "alpha.png", Image.new("RGBA", (40, 30), (255, 0, 0, 0)))
    write_image(root / "png_as_jpg", "png.jpg", Image.new("RGB", (40, 30), (0, 0, 200)), format="PNG")
    write_image(root / "huge", "huge.jpg", Image.new("RGB", (10_000, 10_000), (0, 200, 0)), quality=50)
    (root / "gray" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_unusual_images_decode_to_the_right_colours(kind, unusual, caplog):
    with caplog.at_level(logging.WARNING, logger="fastssl.data"):
        load = loader(kind, unusual, batch_size=5, train=False)
    assert "ignored 1 file(s) without an image extension" in caplog.text
    (view,), labels, _ = next(iter(load))
    colour = {load.classes[label]: view[i].float().mean((1, 2)).tolist() for i, label in enumerate(labels.tolist())}
    expected = {"gray": (128, 128, 128), "cmyk": (255, 0, 255), "alpha": (255, 255, 255),
                "png_as_jpg": (0, 0, 200), "huge": (0, 200, 0)}
    for name, rgb in expected.items():
        assert np.allclose(colour[name], rgb, atol=6), (name, colour[name])


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_unreadable_files_stop_the_run_naming_the_file(kind, tmp_path):
    bad_image_folder(tmp_path, 8)
    load = loader(kind, tmp_path, batch_size=19, train=False)
    with pytest.raises(RuntimeError, match=r"cannot decode image .*a/3_truncated.jpg: truncated JPEG.*on_bad_image=skip"):
        list(load)


@pytest.mark.parametrize("kind", FOLDER_KINDS)
@pytest.mark.parametrize("train", [True, False])
def test_unreadable_files_are_skipped_and_listed(kind, train, tmp_path):
    reasons = bad_image_folder(tmp_path / "data", 8)
    skipped = SkippedImages(tmp_path / "run" / "skipped_images.tsv")
    load = loader(kind, tmp_path / "data", on_bad_image="skip", skipped=skipped, batch_size=19 if not train else 8,
                  train=train)
    load_all = list(load) if not train else [b for epoch in range(3) for b in (load.set_epoch(epoch), list(load))[1]]
    for views, labels, indices in load_all:
        assert all(v.shape[0] == len(labels) == len(indices) for v in views)     # batches stay whole
        for label, index in zip(labels.tolist(), indices.tolist()):
            path = load.samples[index][0]
            assert "/".join(path.split("/")[-2:]) not in reasons and load.classes[label] == path.split("/")[-2]
    if not train:
        assert [len(b[2]) for b in load_all] == [19]
    lines = (tmp_path / "run" / "skipped_images.tsv").read_text().splitlines()
    assert lines[0] == "path\treason" and len(lines) == 1 + 3
    for line in lines[1:]:
        path, reason = line.split("\t")
        assert reasons["/".join(path.split("/")[-2:])] in reason


def corrupt_huffman_table(path) -> None:
    """A JPEG that passes the quick check (whole, header readable) but that libjpeg rejects
    ("Bogus Huffman table definition"): the first table's code counts add up to over 256.
    (Garbage in the middle of the entropy-coded data does not do: libjpeg decodes through it.)"""
    data = bytearray(path.read_bytes())
    table = data.index(b"\xff\xc4")              # DHT: marker, length (2), class/id (1), 16 counts
    data[table + 5:table + 21] = b"\x80" * 16
    path.write_bytes(bytes(data))


@pytest.fixture
def folder_with_undecodable(tiny, tmp_path):
    """32 images in 2 classes (a batch of 8 uses all of them every epoch), one that passes the
    quick check but not the decoders."""
    import shutil

    from fastssl.data.encoded import read_encoded
    for name in ("disk", "ring"):
        shutil.copytree(tiny[0] / name, tmp_path / name)
    bad = sorted((tmp_path / "ring").iterdir())[4]
    corrupt_huffman_table(bad)
    read_encoded(str(bad))                       # raises if the quick check would catch it
    return tmp_path, str(bad)


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_undecodable_file_error_names_it(kind, folder_with_undecodable):
    root, bad = folder_with_undecodable
    with pytest.raises(RuntimeError, match=f"cannot decode image {bad}: .*data.on_bad_image=skip"):
        list(loader(kind, root, size=12))


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_undecodable_file_is_skipped_like_the_pil_loader_does(kind, folder_with_undecodable):
    root, bad = folder_with_undecodable
    load, pil = loader(kind, root, "skip", size=12), loader("pil", root, "skip", size=12)
    bad_index = [path for path, _ in load.samples].index(bad)
    for epoch in range(2):                       # the second epoch replaces it before decoding
        load.set_epoch(epoch)
        pil.set_epoch(epoch)
        batches, reference = list(load), list(pil)
        assert len(batches) == 4 and all(views[0].shape == (8, 3, 12, 12) for views, _, _ in batches)
        indices = torch.cat([b[2] for b in batches])
        assert bad_index not in indices.tolist()
        assert (indices == bad_index + 1).sum() == 2     # its slot: the next image, with the slot's seed
        assert torch.equal(indices, torch.cat([b[2] for b in reference]))
        # the same crops of the same images: resamplers differ by rounding only (PIL rounds to
        # 8 bits between its two passes; torch and DALI do not), other crops by more than 20
        for (views, _, _), (views_pil, _, _) in zip(batches, reference):
            assert all((a.float() - b.float()).abs().mean() < 1.5 for a, b in zip(views, views_pil))
    assert list(load.skipped.reasons) == [bad]


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_folder_errors_are_clear(kind, tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        loader(kind, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        loader(kind, tmp_path / "missing")
    for i in range(5):
        write_image(tmp_path / "few" / "cls", f"{i}.jpg", Image.new("RGB", (8, 8)))
    (tmp_path / "few" / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"holds 5 images, fewer than one batch \(train.batch_size=8\)"):
        loader(kind, tmp_path / "few")
    load = loader(kind, tmp_path / "few", batch_size=5)
    assert load.classes == ["cls", "empty_class"] and len(list(load)) == 1   # an empty class keeps its label


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", [k for k in KINDS if (k.values[0] if hasattr(k, "values") else k) != "pil"])
def test_gpu_decoding_matches_the_cpu(kind, tiny):
    train, _ = tiny
    got = {}
    for device in ("cpu", "cuda"):
        load = loader(kind, train, size=12, batch_size=16, seed=4, device=device)
        load.set_epoch(0)
        got[device] = next(iter(load))
    (cpu_views, cpu_labels, cpu_indices), (gpu_views, gpu_labels, gpu_indices) = got["cpu"], got["cuda"]
    assert all(v.device.type == "cuda" for v in gpu_views) and gpu_labels.device.type == "cuda"
    assert torch.equal(cpu_indices, gpu_indices.cpu()) and torch.equal(cpu_labels, gpu_labels.cpu())
    # nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling: 4.2 levels on average on an
    # H100 with these small images; a view shifted by one pixel differs by 10.7, swapped channels by 57.
    for a, b in zip(cpu_views, gpu_views):
        assert (a.float() - b.cpu().float()).abs().mean() < 7.5


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_workers_started_by_a_forkserver_give_the_same_batches(kind, tiny, monkeypatch):
    """Feeding a GPU, the workers start from a clean server process instead of a fork of a
    process that holds CUDA state (imagefolder.worker_context); checked here on the CPU,
    where they would be forked, by asking for the server."""
    from fastssl.data import imagefolder
    served_context = imagefolder.worker_context(torch.device("cuda"))
    assert served_context.get_start_method() == "forkserver"
    assert imagefolder.worker_context(torch.device("cpu")) is None
    train, _ = tiny

    def first_epoch():
        cfg = data_config(kind, workers=2)
        load = build_loader(cfg, str(train), size=12, batch_size=32, seed=3)
        load.set_epoch(0)
        return load.loader.multiprocessing_context, list(load)

    forked_with, forked = first_epoch()
    monkeypatch.setattr(imagefolder, "worker_context", lambda device: served_context)
    served_with, served = first_epoch()
    assert forked_with is None and served_with.get_start_method() == "forkserver"
    assert len(served) == len(forked) == 5
    for (views_s, labels_s, indices_s), (views_f, labels_f, indices_f) in zip(served, forked):
        assert torch.equal(indices_s, indices_f) and torch.equal(labels_s, labels_f)
        assert all(torch.equal(a, b) for a, b in zip(views_s, views_f))


FORKSERVER_MAIN = """
import json, os, sys
from pathlib import Path
from types import SimpleNamespace
imported_before = "fastssl.data.imagefolder" in sys.modules
import torch
from fastssl.data import build_loader, imagefolder
if __name__ == "__mp_main__":          # this script, re-run in a worker before it reads its dataset
    (Path(os.environ["MARKS"]) / str(os.getpid())).write_text(str(imported_before))
if __name__ == "__main__":
    served = imagefolder.worker_context(torch.device("cuda"))
    imagefolder.worker_context = lambda device: served
    cfg = SimpleNamespace(**{**json.loads(sys.argv[2]), "workers": 2})
    load = build_loader(cfg, sys.argv[1], size=12, batch_size=16, seed=3)
    load.set_epoch(0)
    batches = iter(load.loader)
    next(batches)
    print(json.dumps([w.pid for w in batches._workers]))
"""


def test_forkserver_workers_do_not_import_torch_and_fastssl_again(tiny, tmp_path):
    """The forkserver imports the fastssl modules the main process has (torch comes with them)
    before it forks a worker. CPython before 3.13.8 re-runs the main script in every worker
    (python/cpython#126631): without the preload each of them imported torch and fastssl anew
    (about 10 s each on the H100 machine, one after another: 16 workers took minutes)."""
    import json
    import subprocess
    import sys
    script, marks = tmp_path / "main.py", tmp_path / "marks"
    script.write_text(FORKSERVER_MAIN)
    marks.mkdir()
    cfg = vars(data_config("pil"))
    out = subprocess.run([sys.executable, str(script), str(tiny[0]), json.dumps(cfg)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "MARKS": str(marks)},
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    workers = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert len(workers) == 2
    # Each worker that re-ran the script (all of them before CPython 3.13.8) found fastssl imported.
    reruns = {int(p.name): p.read_text() for p in marks.iterdir()}
    assert set(reruns) <= workers
    assert all(found == "True" for found in reruns.values()), reruns
    if sys.version_info < (3, 13):
        assert set(reruns) == workers


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_training_lists_skipped_files_in_the_run_directory(kind, tiny, tiny_config, tmp_path):
    import json
    import shutil

    from fastssl.train import train
    data = tmp_path / "data"
    shutil.copytree(tiny[0], data)
    (data / "disk" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    cfg = tiny_config(**{"data.loader": kind, "data.train": str(data), "data.val": str(tiny[1]),
                         "data.on_bad_image": "skip", "train.epochs": 1, "data.workers": 1})
    results = train(cfg)
    assert results["knn_top1"] >= 0
    lines = (tmp_path / "run" / "skipped_images.tsv").read_text().splitlines()
    assert lines == ["path\treason", f"{data / 'disk' / 'zz_broken.jpg'}\ttruncated JPEG (no end-of-image marker "
                                     "after the last scan)"]
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["event"] == "eval" and final["skipped_images"] == 1


SAMPLE = Path(__file__).parent.parent.parent / "shared" / "data" / "imagenet-sample"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared/data/imagenet-sample not present")
@pytest.mark.parametrize("kind", KINDS)
def test_real_photos(kind, tmp_path):
    photos = sorted(SAMPLE.iterdir())[:16]       # ImageNet JPEGs, about 500 x 375, some grayscale
    for f in photos:
        folder = tmp_path / "photos" / ("a" if f.name < photos[8].name else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f.name).symlink_to(f)
    load = loader(kind, tmp_path / "photos", size=64, batch_size=16, seed=1)
    load.set_epoch(0)
    (first, second), labels, indices = next(iter(load))
    assert first.shape == second.shape == (16, 3, 64, 64) and first.dtype == torch.uint8
    assert sorted(indices.tolist()) == list(range(16)) and labels.tolist().count(0) == 8
    for view in (first, second):
        per_image = view.float().std((1, 2, 3))
        assert (per_image > 10).all() and 30 < view.float().mean() < 220    # photos, not blanks
    assert (first.float() - second.float()).abs().mean() > 10               # two different crops

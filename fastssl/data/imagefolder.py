"""The reference input pipeline: a PyTorch DataLoader over an ImageFolder, decoding with PIL.

Every loader yields the same thing, so the trainer and the augmentation never know which one
runs: `(views, labels, indices)` with `views` a list of uint8 (N, 3, S_v, S_v) tensors on the target
device (RandomResizedCrops of each image for pre-training: two by default, or one per `ViewCrop`,
each with its own size and ranges for multi-crop), `labels` and `indices` int64 (N,).

Reproducibility: the sampler hands each image a seed derived from (seed, epoch, position), and
the dataset draws that image's crops from it, so a batch's pixels do not depend on the number
of workers, and epoch e of a resumed run sees exactly what an uninterrupted run saw.

Several processes (torchrun): every rank draws the same permutation of the epoch, keeps the
first `batches x global batch` positions (the remainder is dropped, so every rank has the same
number of batches), and takes its own contiguous slice of each global batch: rank r's k-th
batch is positions [k*B + r*b, k*B + (r+1)*b) of the permutation (B = global, b = B / ranks).
Concatenated over ranks, the k-th batches are exactly the single-process k-th batch.

Mid-epoch resume: `set_epoch(e, start_batch=k)` starts at batch k without reading (let alone
decoding) the images of the skipped batches.
"""
import io
import logging
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fastssl.data.badimages import BadImage, SkippedImages, load_readable, read_image_bytes
from fastssl.data.crops import view_boxes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
log = logging.getLogger("fastssl.data")


def scan_image_folder(root) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples, classes): every image file under root/<class>/, labels in sorted class order."""
    root = Path(os.path.expanduser(str(root)))
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root} (an ImageFolder has one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>.jpg)")
    samples, ignored = [], []
    for label, name in enumerate(classes):
        files = [p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith(".")]
        images = sorted(str(p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
        ignored.extend(str(p) for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS)
        if not images:
            log.warning("class folder %s holds no images; its label %d stays reserved", root / name, label)
        samples.extend((f, label) for f in images)
    if ignored:
        log.warning("%s: ignored %d file(s) without an image extension (%s), e.g. %s", root, len(ignored),
                    ", ".join(IMAGE_EXTENSIONS), sorted(ignored)[0])
    if not samples:
        raise ValueError(f"{root} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return samples, classes


def load_rgb(path: str) -> Image.Image:
    """Decode any PIL-readable image file to RGB; BadImage (a RuntimeError) naming the file when
    it cannot be read or decoded."""
    return decode_rgb(read_image_bytes(path), path)


def decode_rgb(data: bytes, path: str) -> Image.Image:
    """The RGB image of a file's bytes (grayscale, CMYK, palette, alpha over white); BadImage
    naming `path` when PIL cannot decode them."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))  # alpha over white
                img = Image.alpha_composite(canvas, img)
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad files; all mean "cannot decode"
        raise BadImage(path, f"{type(exc).__name__}: {exc}") from exc


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def worker_context(device: torch.device) -> Optional[multiprocessing.context.BaseContext]:
    """How the loaders start their worker processes: forked (the default, cheapest) when they
    feed the CPU, from a clean server process ("forkserver") when they feed a GPU. A child forked
    from a process holding CUDA state may touch it and abort: on an H100 the evaluation loader's
    forked workers died of DALI's cudaErrorInitializationError while the training loader's DALI
    pipeline was alive. The price: each worker receives the dataset pickled, once per loader.

    The server imports the fastssl modules this process has imported (torch and the decoders come
    with them) before it forks any worker (those of the first call: the server starts once).
    Without that, each worker imported them itself: CPython before 3.13.8 never preloads
    `__main__` into the server (python/cpython#126631), so every worker re-ran the main script and
    its imports, about 10 s on the H100 machine; and since a worker reads its pickled dataset only
    after that, the main process, writing it into a pipe, started its 16 workers one after another
    and waited minutes for the first batch. Where the server cannot import fastssl (CPython before
    3.12.8 ignores sys.path there, python/cpython#117378: a checkout that is not installed, run
    from another folder) workers start the slow way."""
    if device.type != "cuda":
        return None
    context = multiprocessing.get_context("forkserver")
    loaded = sorted(name for name in sys.modules
                    if (name == "fastssl" or name.startswith("fastssl.")) and not name.endswith("__main__"))
    context.set_forkserver_preload(["__main__", *loaded])
    return context


class ViewCrop(NamedTuple):
    """The random crop of one view: output side in pixels, area-fraction and aspect-ratio ranges."""
    size: int
    scale: Sequence[float] = (0.08, 1.0)
    ratio: Sequence[float] = (3 / 4, 4 / 3)


class MultiViewDataset(Dataset):
    """`dataset[(index, seed)]` -> ([one uint8 (3, S_v, S_v) crop per ViewCrop], label, index, skipped).

    One decode per image; the crops are drawn in view order from the image's seed. Under
    `on_bad_image="skip"` an unreadable image is replaced by the next readable one (its label and
    index are returned) and `skipped` lists the (path, reason) passed over."""

    def __init__(self, samples, views: Sequence[ViewCrop], on_bad_image: str = "error"):
        self.samples, self.views, self.on_bad_image = samples, list(views), on_bad_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index_and_seed):
        index, seed = index_and_seed
        img, index, skipped = load_readable(self.samples, index, lambda i: load_rgb(self.samples[i][0]),
                                            self.on_bad_image)
        boxes = view_boxes(self.views, img.height, img.width, torch.Generator().manual_seed(seed))
        out = [to_uint8_chw(img.resize((view.size, view.size), Image.BILINEAR, box=box))
               for view, box in zip(self.views, boxes)]
        return out, self.samples[index][1], index, skipped


class CenterViewDataset(Dataset):
    """One deterministic view for evaluation: shorter side resized to S, centre crop S x S
    (unreadable images as in MultiViewDataset)."""

    def __init__(self, samples, size: int, on_bad_image: str = "error"):
        self.samples, self.size, self.on_bad_image = samples, size, on_bad_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        img, index, skipped = load_readable(self.samples, index, lambda i: load_rgb(self.samples[i][0]),
                                            self.on_bad_image)
        scale = self.size / min(img.width, img.height)
        w, h = max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.resize((w, h), Image.BILINEAR).crop((left, top, left + self.size, top + self.size))
        return to_uint8_chw(img), self.samples[index][1], index, skipped


def collate_with_skipped(batch):
    """Default collation of (views, label, index), and the skipped files of the batch as one list."""
    views, labels, indices = default_collate([sample[:3] for sample in batch])
    return views, labels, indices, [entry for sample in batch for entry in sample[3]]


class EpochSampler(Sampler):
    """Yields (index, per-image seed); the order is a permutation drawn from (seed, epoch).

    With `batch_size` (the per-rank batch) set, only whole global batches are yielded, this
    rank's slice of each, from batch `start_batch` on (see the module docstring).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, batch_size: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.batch_size, self.rank, self.world_size, self.start_batch = batch_size, rank, world_size, 0
        self.order = None

    def set_epoch(self, epoch: int, start_batch: int = 0, order: Optional[torch.Tensor] = None) -> None:
        """`order`: the n dataset indices to visit instead of the seeded permutation (the method's
        sampling, e.g. uniform over clusters; indices may repeat)."""
        if order is not None:
            order = torch.as_tensor(order, dtype=torch.long).cpu()
            if order.shape != (self.n,):
                raise ValueError(f"an epoch order must hold {self.n} indices in [0, {self.n}), "
                                 f"got shape {tuple(order.shape)}")
            if self.n and not 0 <= int(order.min()) <= int(order.max()) < self.n:
                raise ValueError(f"an epoch order must hold {self.n} indices in [0, {self.n}), "
                                 f"got values from {int(order.min())} to {int(order.max())}")
        self.epoch, self.start_batch, self.order = epoch, start_batch, order

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size) if self.batch_size else 0

    def __len__(self) -> int:
        if not self.batch_size:
            return self.n
        return max(0, self.batches_per_epoch() - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        if self.order is not None:    # the permutation is drawn all the same: the crop seeds below follow it
            order = self.order
        seeds = torch.randint(0, 2**62, (self.n,), generator=gen)
        if self.batch_size:
            b, nb = self.batch_size, self.batches_per_epoch()
            mine = torch.arange(nb * b * self.world_size).view(nb, self.world_size, b)[self.start_batch:, self.rank]
            mine = mine.reshape(-1)
            order, seeds = order[mine], seeds[mine]
        return iter(zip(order.tolist(), seeds.tolist()))


class ImageFolderLoader:
    """Batches of `(views, labels, indices)` on `device`; `set_epoch(e)` before each epoch."""

    def __init__(self, root, *, size: int, batch_size: int, seed: int = 0, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), views: Sequence[ViewCrop] = None, workers: int = 2, device="cpu",
                 train: bool = True, rank: int = 0, world_size: int = 1, on_bad_image: str = "error",
                 skipped: Optional[SkippedImages] = None):
        """`batch_size` is per process; with `world_size` processes a global batch is
        `batch_size * world_size` images; an evaluation loader gives rank r images r, r + W, ...
        Training yields one crop per entry of `views` (default: two crops of `size` with `scale`
        and `ratio`); evaluation yields one centre view of `size`. Unreadable images follow
        `on_bad_image` (fastssl.data.badimages); skipped ones are recorded in `skipped`."""
        self.samples, self.classes = scan_image_folder(root)
        self.device = torch.device(device)
        self.train = train
        self.skipped = skipped if skipped is not None else SkippedImages()
        self.views = list(views or [ViewCrop(size, scale, ratio)] * 2) if train else [ViewCrop(size)]
        if train:
            check_batch_fits(root, len(self.samples), batch_size * world_size)
            self.sampler = EpochSampler(len(self.samples), seed, batch_size=batch_size, rank=rank,
                                        world_size=world_size)
        else:
            # Several ranks share an evaluation pass image by image (rank r: images r, r + W, ...).
            self.sampler = range(rank, len(self.samples), world_size) if world_size > 1 else None
        dataset, collate = self.dataset(on_bad_image)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, shuffle=False, drop_last=train,
            num_workers=workers, pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            multiprocessing_context=worker_context(self.device) if workers > 0 else None,
            collate_fn=collate)

    def dataset(self, on_bad_image: str):
        """(dataset, collate_fn) that the DataLoader's workers run: decoded, cropped views here."""
        if self.train:
            return MultiViewDataset(self.samples, self.views, on_bad_image), collate_with_skipped
        return CenterViewDataset(self.samples, self.views[0].size, on_bad_image), collate_with_skipped

    def set_epoch(self, epoch: int, start_batch: int = 0, order: Optional[torch.Tensor] = None) -> None:
        """Epoch `epoch` from its batch `start_batch` on (the earlier ones are not read), visiting
        the images in `order` when given (see EpochSampler.set_epoch)."""
        self.sampler.set_epoch(epoch, start_batch, order)

    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (len() counts those left after `start_batch`)."""
        return self.sampler.batches_per_epoch() if self.train else len(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for views, labels, indices, skipped in self.loader:
            self.skipped.add(skipped)
            if not self.train:
                views = [views]
            yield ([v.to(self.device, non_blocking=True) for v in views],
                   labels.to(self.device, non_blocking=True), indices.to(self.device, non_blocking=True))


def check_batch_fits(root, images: int, global_batch: int) -> None:
    """A training loader needs at least one whole global batch of images."""
    if images < global_batch:
        raise ValueError(f"{root} holds {images} images, fewer than one batch "
                         f"(train.batch_size={global_batch}); lower the batch size")

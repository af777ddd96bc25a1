"""Encoded batches for the loaders that decode elsewhere (`torch` on the device, `dali` in DALI).

Worker processes read and check each file's bytes, read the image size from its header and
resolve the crops: the decoder then receives, per image, the encoded bytes and one pixel box
per view. The boxes are those the `pil` loader cuts for the same (seed, epoch, image), so the
order, the sharding, the remainder, mid-epoch resume and the crop distribution are shared by
every ImageFolder loader, and only the decoding and resizing differ.

Files other than JPEGs (PNG, WebP, GIF, ...; rare in photo datasets) are decoded by PIL in the
workers, as the `pil` loader reads them (alpha over white, palettes), and travel as raw PNM
pixels: the decoders then meet JPEG and PNM only (nvJPEG reads JPEG alone; DALI drops alpha).
"""
import io
from typing import List, NamedTuple, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from fastssl.data.badimages import BadImage, image_format, load_readable, read_image_bytes, stop_on
from fastssl.data.crops import view_boxes
from fastssl.data.imagefolder import ImageFolderLoader, decode_rgb


class EncodedBatch(NamedTuple):
    """`data`: one uint8 tensor of file bytes per image; `boxes`: (N, V, 4) int64 pixel boxes
    (left, top, right, bottom), one per view; `sizes`: (N, 2) int64 (height, width) from the header;
    `paths`: the files (to name one that fails to decode); `skipped`: (path, reason) passed over."""
    data: List[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    sizes: torch.Tensor
    boxes: torch.Tensor
    paths: List[str]
    skipped: List[Tuple[str, str]]


def read_encoded(path: str) -> Tuple[bytes, int, int]:
    """(bytes, height, width) of an image file that passes the quick check: a JPEG as it is, with
    its size from the header (the pixels are not decoded), any other format decoded by PIL and
    given as PNM; BadImage naming the file otherwise."""
    data = read_image_bytes(path)
    if image_format(data) != "jpeg":
        image = decode_rgb(data, path)
        return PNM_HEADER % image.size + image.tobytes(), image.height, image.width
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception as exc:  # PIL raises many types for bad headers; all mean "cannot decode"
        raise BadImage(path, f"{type(exc).__name__}: {exc}") from exc
    return data, height, width


PNM_HEADER = b"P6 %d %d 255\n"          # binary RGB, width and height


def pnm_pixels(data: torch.Tensor) -> torch.Tensor:
    """The (3, H, W) uint8 pixels of PNM bytes written by read_encoded (a view, not a copy)."""
    header = bytes(data[:32].tolist()).split(b"\n", 1)[0]
    width, height = (int(v) for v in header.split()[1:3])
    return data[len(header) + 1:].view(height, width, 3).permute(2, 0, 1)


def centre_box(height: int, width: int) -> Tuple[int, int, int, int]:
    """The centre square of side min(H, W): resized to S it is the `pil` loader's evaluation view."""
    side = min(height, width)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


class EncodedDataset(Dataset):
    """`dataset[(index, seed)]` (training) or `dataset[index]` (evaluation) -> (bytes as a uint8
    tensor, label, index, (H, W), (V, 4) boxes, path, skipped); unreadable files as in the pil loader."""

    def __init__(self, samples, views, train: bool, on_bad_image: str):
        self.samples, self.views, self.train, self.on_bad_image = samples, views, train, on_bad_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if self.train else (key, None)
        (data, height, width), index, skipped = load_readable(
            self.samples, index, lambda i: read_encoded(self.samples[i][0]), self.on_bad_image)
        if self.train:
            boxes = view_boxes(self.views, height, width, torch.Generator().manual_seed(seed))
        else:
            boxes = [centre_box(height, width)]
        path, label = self.samples[index]
        return (torch.frombuffer(bytearray(data), dtype=torch.uint8), label, index, (height, width), boxes,
                path, skipped)


def collate_encoded(batch):
    """The batch's file bytes packed into one tensor (with their lengths): a worker hands one
    shared-memory block to the main process rather than one per image, which is about twice as
    fast; `encoded_batches` unpacks them into an EncodedBatch (views, no copy)."""
    data, labels, indices, sizes, boxes, paths, skipped = zip(*batch)
    return (torch.cat(data), torch.tensor([len(d) for d in data]), torch.tensor(labels), torch.tensor(indices),
            torch.tensor(sizes), torch.tensor(boxes), list(paths), [entry for s in skipped for entry in s])


class EncodedFolderLoader(ImageFolderLoader):
    """An ImageFolder loader whose workers yield EncodedBatch; subclasses decode them in `__iter__`
    (with `encoded_batches()`). A file their decoder fails on goes to `undecodable_file`, which
    ends the run or, under `skip`, replaces it in this batch and, through `without_undecodable`,
    in every later one."""

    def __init__(self, root, **kwargs):
        super().__init__(root, **kwargs)
        self.undecodable = {}      # path -> reason: files that passed the workers' check but not the decoder

    def dataset(self, on_bad_image: str):
        return EncodedDataset(self.samples, self.views, self.train, on_bad_image), collate_encoded

    def encoded_batches(self):
        for packed, lengths, *rest in self.loader:
            batch = EncodedBatch(list(torch.split(packed, lengths.tolist())), *rest)
            self.skipped.add(batch.skipped)
            yield batch

    def undecodable_file(self, batch: EncodedBatch, k: int, j: int, reason: str) -> EncodedBatch:
        """Slot j of batch k holds a file the decoder fails on: under `error` the run stops naming
        it; under `skip` it is recorded and the batch returned with the slot replaced."""
        path = batch.paths[j]
        if self.loader.dataset.on_bad_image != "skip":
            raise stop_on(BadImage(path, reason))
        self.undecodable[path] = reason
        self.skipped.add([(path, reason)])
        return self.replace(batch, k, j)

    def without_undecodable(self, batch: EncodedBatch, k: int) -> EncodedBatch:
        """Batch k with the files the decoder already failed on replaced (only under `skip`: under
        `error` the first one ended the run)."""
        for j in range(len(batch.paths)):
            while batch.paths[j] in self.undecodable:
                batch = self.replace(batch, k, j)
        return batch

    def replace(self, batch: EncodedBatch, k: int, j: int) -> EncodedBatch:
        """`batch` (batch k of this epoch's iteration) with slot j filled by the next image after
        it, in dataset order, that passes the workers' check and that the decoder has not failed
        on, its boxes drawn from the slot's seed, as the workers do for a file that fails their
        check."""
        key = list(self.loader.sampler)[k * self.loader.batch_size + j] if self.train else None  # (index, seed)
        index = int(batch.indices[j])
        for _ in range(len(self.samples)):
            index = (index + 1) % len(self.samples)
            if self.samples[index][0] in self.undecodable:
                continue
            item = self.loader.dataset[(index, key[1]) if self.train else index]
            self.skipped.add(item[6])                 # the workers' check may pass over some files
            if item[5] not in self.undecodable:
                return put(batch, j, item)
        raise RuntimeError(f"no image of the {len(self.samples)} in the dataset can be decoded")


def put(batch: EncodedBatch, j: int, item) -> EncodedBatch:
    """`batch` with slot j replaced by an EncodedDataset item (data, label, index, size, boxes, path, skipped)."""
    data, label, index, size, boxes, path, _ = item
    labels, indices, sizes, all_boxes = (t.clone() for t in (batch.labels, batch.indices, batch.sizes, batch.boxes))
    labels[j], indices[j], sizes[j], all_boxes[j] = label, index, torch.tensor(size), torch.tensor(boxes)
    return batch._replace(data=batch.data[:j] + [data] + batch.data[j + 1:], labels=labels, indices=indices,
                          sizes=sizes, boxes=all_boxes, paths=batch.paths[:j] + [path] + batch.paths[j + 1:])

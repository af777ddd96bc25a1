"""Encoded batches for the loaders that decode elsewhere (`torch` on the device, `dali` in DALI).

Worker processes read and check each file's bytes, read the image size from its header and
resolve the crops: the decoder then receives, per image, the encoded bytes and one pixel box
per view. The boxes are those the `pil` loader cuts for the same (seed, epoch, image), so the
order, the sharding, the remainder, mid-epoch resume and the crop distribution are shared by
every ImageFolder loader, and only the decoding and resizing differ.
"""
import io
from typing import List, NamedTuple, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from fastssl.data.badimages import BadImage, load_readable, read_image_bytes
from fastssl.data.crops import crop_box_pixels, crop_boxes, sample_crop_params
from fastssl.data.imagefolder import ImageFolderLoader


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
    """(bytes, height, width) of an image file that passes the quick check and whose header
    PIL can read (the pixels are not decoded); BadImage naming the file otherwise."""
    data = read_image_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception as exc:  # PIL raises many types for bad headers; all mean "cannot decode"
        raise BadImage(path, f"{type(exc).__name__}: {exc}") from exc
    return data, height, width


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
            gen = torch.Generator().manual_seed(seed)
            boxes = [crop_box_pixels(crop_boxes(sample_crop_params(1, v.scale, v.ratio, gen), height, width)[0])
                     for v in self.views]
        else:
            boxes = [centre_box(height, width)]
        path, label = self.samples[index]
        return (torch.frombuffer(bytearray(data), dtype=torch.uint8), label, index, (height, width), boxes,
                path, skipped)


def collate_encoded(batch) -> EncodedBatch:
    data, labels, indices, sizes, boxes, paths, skipped = zip(*batch)
    return EncodedBatch(list(data), torch.tensor(labels), torch.tensor(indices), torch.tensor(sizes),
                        torch.tensor(boxes), list(paths), [entry for s in skipped for entry in s])


class EncodedFolderLoader(ImageFolderLoader):
    """An ImageFolder loader whose workers yield EncodedBatch; subclasses decode them in `__iter__`
    (with `encoded_batches()`) and record `self.skipped` through it."""

    def dataset(self, on_bad_image: str):
        return EncodedDataset(self.samples, self.views, self.train, on_bad_image), collate_encoded

    def encoded_batches(self):
        for batch in self.loader:
            self.skipped.add(batch.skipped)
            yield batch

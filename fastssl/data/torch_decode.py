"""The `torch` loader: JPEGs decoded in batches on the training device by torchvision (nvJPEG on
a GPU, libjpeg-turbo on the CPU), views cut and resized there. For machines without DALI.

Worker processes read the files and resolve the crop boxes (fastssl.data.encoded); the main
process decodes a batch with one `decode_jpeg` call and resizes every view with antialiased
bilinear interpolation (as PIL and DALI do), so the images never exist decoded in host memory
when the device is a GPU. Files that are not JPEGs (PNG, WebP, BMP, ...) are rare in photo
datasets; they are decoded by PIL on the CPU (`load_rgb`: alpha over white) and moved over.

A JPEG that passes the quick check (fastssl.data.badimages) but fails to decode is found by
decoding the batch's JPEGs one by one; it ends the run naming the file, or under
`data.on_bad_image=skip` its slot is filled by the next readable image of the dataset, cut with
the same relative box.
"""
import logging
from typing import List

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from fastssl.data.badimages import BadImage, image_format, load_readable
from fastssl.data.encoded import EncodedFolderLoader, read_encoded
from fastssl.data.imagefolder import load_rgb, to_uint8_chw

log = logging.getLogger("fastssl.data")


def resize_view(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """The (3, size, size) uint8 view of a (3, H, W) uint8 image cut at pixel box (left, top, right, bottom)."""
    left, top, right, bottom = (int(v) for v in box)
    crop = image[None, :, top:bottom, left:right].float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


class TorchDecodeLoader(EncodedFolderLoader):
    """Batches of `(views, labels, indices)` decoded on `device` (see the module docstring)."""

    def __iter__(self):
        for batch in self.encoded_batches():
            images, boxes, labels, indices = self.decode(batch)
            labels, indices = labels.to(self.device, non_blocking=True), indices.to(self.device, non_blocking=True)
            views = [torch.stack([resize_view(img, b[v], view.size) for img, b in zip(images, boxes)])
                     for v, view in enumerate(self.views)]
            yield views, labels, indices

    def decode(self, batch):
        """(images, boxes, labels, indices): one (3, H, W) uint8 image per slot on the device, and
        the slots' boxes, labels and indices (a replaced slot's are those of its new image)."""
        images: List[torch.Tensor] = [None] * len(batch.data)
        boxes, labels, indices = batch.boxes.clone(), batch.labels.clone(), batch.indices.clone()
        jpeg = [i for i, data in enumerate(batch.data) if image_format(data[:12].numpy().tobytes()) == "jpeg"]
        for i in range(len(batch.data)):
            if i not in jpeg:
                images[i] = to_uint8_chw(load_rgb(batch.paths[i])).to(self.device)
        try:
            decoded = decode_jpeg([batch.data[i] for i in jpeg], mode=ImageReadMode.RGB, device=self.device)
            for i, img in zip(jpeg, decoded):
                images[i] = img
        except RuntimeError:         # one bad JPEG fails the whole call: decode them one by one
            for i in jpeg:
                try:
                    images[i] = self.decode_one(batch.data[i], batch.paths[i])
                except BadImage as exc:
                    images[i], boxes[i], indices[i] = self.replace(batch, i, exc)
                    labels[i] = self.samples[int(indices[i])][1]
        return images, boxes, labels, indices

    def decode_one(self, data: torch.Tensor, path: str) -> torch.Tensor:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            raise BadImage(path, f"JPEG decoder: {exc}") from exc

    def replace(self, batch, slot: int, exc: BadImage):
        """Under `skip`, (image, boxes, index) of the next readable image after the bad one, the
        slot's boxes scaled to it."""
        on_bad_image = self.loader.dataset.on_bad_image
        if on_bad_image != "skip":
            raise RuntimeError(f"{exc} (set data.on_bad_image=skip to skip such files)") from exc
        self.skipped.add([(exc.path, exc.reason)])

        def decoded(i):
            path = self.samples[i][0]
            data, _, _ = read_encoded(path)
            if image_format(data) != "jpeg":
                return to_uint8_chw(load_rgb(path)).to(self.device)
            return self.decode_one(torch.frombuffer(bytearray(data), dtype=torch.uint8), path)

        start = (int(batch.indices[slot]) + 1) % len(self.samples)
        image, index, skipped = load_readable(self.samples, start, decoded, on_bad_image)
        self.skipped.add(skipped)
        (old_h, old_w), (h, w) = batch.sizes[slot].tolist(), image.shape[1:]
        boxes = (batch.boxes[slot] * torch.tensor([w / old_w, h / old_h] * 2)).round().long()
        boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp(0, w - 1), boxes[:, 1::2].clamp(0, h - 1)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        return image, boxes, index

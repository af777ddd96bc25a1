"""The `torch` loader: JPEGs decoded in batches on the training device by torchvision (nvJPEG on
a GPU, libjpeg-turbo on the CPU), views cut and resized there. For machines without DALI.

Worker processes read the files and resolve the crop boxes (fastssl.data.encoded); the main
process decodes a batch with one `decode_jpeg` call and resizes every view with antialiased
bilinear interpolation (as PIL and DALI do), so the images never exist decoded in host memory
when the device is a GPU. Files in other formats arrive as PNM pixels that PIL decoded in the
workers, and are moved over as they are.

A JPEG that passes the quick check (fastssl.data.badimages) but fails to decode is found by
decoding the batch's JPEGs one by one; it ends the run naming the file, or under
`data.on_bad_image=skip` its slot is filled by the next readable image in dataset order (cut
from the slot's seed) and the file is not decoded again.
"""
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from fastssl.data.badimages import image_format
from fastssl.data.encoded import EncodedBatch, EncodedFolderLoader, pnm_pixels


def resize_view(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """The (3, size, size) uint8 view of a (3, H, W) uint8 image cut at pixel box (left, top, right, bottom)."""
    left, top, right, bottom = (int(v) for v in box)
    crop = image[None, :, top:bottom, left:right].float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def is_jpeg(data: torch.Tensor) -> bool:
    return image_format(bytes(data[:4].tolist())) == "jpeg"


class TorchDecodeLoader(EncodedFolderLoader):
    """Batches of `(views, labels, indices)` decoded on `device` (see the module docstring)."""

    def __iter__(self):
        for k, batch in enumerate(self.encoded_batches()):
            images, batch = self.decode(k, batch)
            views = [torch.stack([resize_view(img, boxes[v], view.size) for img, boxes in zip(images, batch.boxes)])
                     for v, view in enumerate(self.views)]
            yield (views, batch.labels.to(self.device, non_blocking=True),
                   batch.indices.to(self.device, non_blocking=True))

    def decode(self, k: int, batch: EncodedBatch):
        """(images, batch): one (3, H, W) uint8 image per slot of batch k on the device, and the
        batch as decoded (slots of undecodable files replaced under `skip`)."""
        batch = self.without_undecodable(batch, k)
        try:
            return self.decode_all(batch.data), batch
        except RuntimeError:       # one bad JPEG fails the whole call: find it, one by one
            for j in range(len(batch.data)):
                while (reason := self.decoder_failure(batch.data[j])) is not None:
                    batch = self.undecodable_file(batch, k, j, reason)
            return self.decode_all(batch.data), batch

    def decode_all(self, data):
        jpeg = [j for j, d in enumerate(data) if is_jpeg(d)]
        images = [None if j in jpeg else pnm_pixels(d).to(self.device) for j, d in enumerate(data)]
        if jpeg:
            decoded = decode_jpeg([data[j] for j in jpeg], mode=ImageReadMode.RGB, device=self.device)
            for j, image in zip(jpeg, decoded):
                images[j] = image
        return images

    def decoder_failure(self, data: torch.Tensor):
        """Why the decoder fails on one file's bytes, or None when it decodes them."""
        try:
            self.decode_all([data])
            return None
        except RuntimeError as exc:
            return f"JPEG decoder: {exc}"

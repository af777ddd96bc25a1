"""Input pipelines. `build_loader` is the one entry point; every loader yields the same batches:
`(views, labels, indices)`, views a list of uint8 (N, 3, S_v, S_v) tensors on the target device,
labels and indices int64 (N,) on the device.

Every loader also has the same interface, so the trainer never knows which one runs:
`set_epoch(epoch, start_batch=0, order=None)` before each epoch (a new seeded order; batches
before `start_batch` are not read; `order` replaces the permutation), `batches_per_epoch()`,
`len()` (batches left in this epoch), `samples` ((source, label) per image, in index order),
`classes`, and `skipped` (the unreadable files passed over, fastssl.data.badimages).

Order, sharding and remainder are the same for every loader (fastssl.data.imagefolder's
EpochSampler): one permutation per (seed, epoch); rank r of W takes its slice of each global
batch; the images after the last whole global batch are left out of that epoch (a different
remainder each epoch, as the permutation changes). Evaluation loaders visit every image once,
in index order, rank r taking images r, r + W, ...
"""

from fastssl.data.badimages import SkippedImages
from fastssl.data.embedded import CLASSES, ensure_embedded_dataset
from fastssl.data.imagefolder import ImageFolderLoader, ViewCrop, load_rgb, scan_image_folder

LOADERS = ("pil", "torch", "dali", "ffcv")


def resolve_paths(data_cfg, log=print):
    """(train, val): the configured data, or the embedded dataset's ImageFolders where empty."""
    train, val = data_cfg.train, data_cfg.val
    if not train or not val:
        emb_train, emb_val = ensure_embedded_dataset(
            data_cfg.cache_dir, data_cfg.embedded_train_per_class, data_cfg.embedded_val_per_class,
            data_cfg.embedded_image_size, log=log)
        train, val = train or str(emb_train), val or str(emb_val)
    return train, val


def build_loader(data_cfg, root, *, size, batch_size, seed=0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 views=None, device="cpu", train=True, rank=0, world_size=1, skipped: SkippedImages = None):
    """The loader named by `data.loader` over the data at `root` (an ImageFolder; for `ffcv` a
    .beton file); `batch_size` is per process, and a training loader yields this rank's share of
    each global batch: one crop per `ViewCrop` in `views` (default: two of `size`, `scale`,
    `ratio`); an evaluation loader (`train=False`) one centre view of `size`."""
    common = dict(size=size, batch_size=batch_size, seed=seed, scale=scale, ratio=ratio, views=views,
                  device=device, train=train, rank=rank, world_size=world_size, skipped=skipped)
    if data_cfg.loader == "pil":
        return ImageFolderLoader(root, workers=data_cfg.workers, on_bad_image=data_cfg.on_bad_image, **common)
    if data_cfg.loader == "torch":
        from fastssl.data.torch_decode import TorchDecodeLoader
        return TorchDecodeLoader(root, workers=data_cfg.workers, on_bad_image=data_cfg.on_bad_image, **common)
    if data_cfg.loader == "dali":
        from fastssl.data.dali_loader import DaliLoader
        return DaliLoader(root, workers=data_cfg.workers, on_bad_image=data_cfg.on_bad_image,
                          decode=data_cfg.dali_decode, **common)
    if data_cfg.loader == "ffcv":
        from fastssl.data.ffcv_loader import FfcvLoader, beton_for
        return FfcvLoader(beton_for(root, data_cfg), workers=data_cfg.workers, order=data_cfg.ffcv_order,
                          os_cache=data_cfg.ffcv_os_cache, **common)
    raise ValueError(f"data.loader: unknown loader {data_cfg.loader!r}; choose one of {', '.join(LOADERS)}")


__all__ = ["CLASSES", "LOADERS", "ImageFolderLoader", "SkippedImages", "ViewCrop", "build_loader",
           "ensure_embedded_dataset", "load_rgb", "resolve_paths", "scan_image_folder"]

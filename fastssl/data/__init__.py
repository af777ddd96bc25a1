"""Input pipelines. `build_loader` is the one entry point; every loader yields the same batches:
`(views, labels, indices)`, views a list of uint8 (N, 3, S_v, S_v) tensors on the target device."""
from fastssl.data.embedded import CLASSES, ensure_embedded_dataset
from fastssl.data.imagefolder import ImageFolderLoader, ViewCrop, load_rgb, scan_image_folder

LOADERS = ("pil",)


def resolve_paths(data_cfg, log=print):
    """(train_dir, val_dir): the configured ImageFolders, or the embedded dataset where empty."""
    train, val = data_cfg.train, data_cfg.val
    if not train or not val:
        emb_train, emb_val = ensure_embedded_dataset(
            data_cfg.cache_dir, data_cfg.embedded_train_per_class, data_cfg.embedded_val_per_class,
            data_cfg.embedded_image_size, log=log)
        train, val = train or str(emb_train), val or str(emb_val)
    return train, val


def build_loader(data_cfg, root, *, size, batch_size, seed=0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 views=None, device="cpu", train=True, rank=0, world_size=1):
    """The loader named by `data.loader` over the ImageFolder at `root`; `batch_size` is per process,
    and a training loader yields this rank's share of each global batch: one crop per `ViewCrop`
    in `views` (default: two of `size`, `scale`, `ratio`)."""
    if data_cfg.loader == "pil":
        return ImageFolderLoader(root, size=size, batch_size=batch_size, seed=seed, scale=scale, ratio=ratio,
                                 views=views, workers=data_cfg.workers, device=device, train=train, rank=rank,
                                 world_size=world_size)
    raise ValueError(f"data.loader: unknown loader {data_cfg.loader!r}; choose one of {', '.join(LOADERS)}")


__all__ = ["CLASSES", "LOADERS", "ImageFolderLoader", "ViewCrop", "build_loader", "ensure_embedded_dataset",
           "load_rgb", "resolve_paths", "scan_image_folder"]

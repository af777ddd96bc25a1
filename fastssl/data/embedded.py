"""The embedded default dataset: 10 classes of shapes, generated deterministically as JPEGs.

No data set can be downloaded on a first run, so we draw one. Each class is a shape; its colour
and the background's (from a small palette), position, scale, rotation, the background's
shading and pixel noise are drawn at random per image, so colour or position alone does not
give the class away. Every image is
a pure function of (split, index): `rng = default_rng([SEED, split_id, index])`.

The split is written as an ImageFolder (`train/<class>/*.jpg`, `val/<class>/*.jpg`) into
`<cache_dir>/<name>/`, first into a temporary folder that is renamed only when complete, so an
interrupted first run never leaves half a dataset behind.
"""
import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("disk", "ring", "square", "frame", "triangle", "plus", "cross", "star", "ell", "bars")
SEED = 20240601
VERSION = 3          # bump when the drawing changes, so caches are regenerated
OVERSAMPLE = 4       # draw at 4x and downsample: smooth edges


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float):
    """Vertices of the filled polygons that make up a shape (in oversampled pixels)."""
    def rotate(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if kind == "square":
        return [rotate([(-r, -r), (r, -r), (r, r), (-r, r)])]
    if kind == "triangle":
        return [rotate([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])]
    if kind == "star":
        pts = [((r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
        return [rotate(pts)]
    w = 0.32 * r
    if kind in ("plus", "cross"):
        bars = [[(-r, -w), (r, -w), (r, w), (-r, w)], [(-w, -r), (w, -r), (w, r), (-w, r)]]
        if kind == "cross":   # the plus turned by 45 degrees
            angle += math.pi / 4
        return [rotate(b) for b in bars]
    if kind == "ell":
        return [rotate([(-r, -r), (-r + 2 * w, -r), (-r + 2 * w, r), (-r, r)]),
                rotate([(-r, r - 2 * w), (r, r - 2 * w), (r, r), (-r, r)])]
    if kind == "bars":
        return [rotate([(-r, -r), (r, -r), (r, -r + 1.6 * w), (-r, -r + 1.6 * w)]),
                rotate([(-r, r - 1.6 * w), (r, r - 1.6 * w), (r, r), (-r, r)])]
    raise ValueError(kind)


# Colours come from a small palette, independent of the class: colour cannot give the class
# away, and (unlike fully random colours) it cannot identify one image among thousands either,
# which would let instance discrimination succeed on colour alone and never look at the shape.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [250, 250, 250], [20, 20, 20]])


def _colour(rng) -> np.ndarray:
    return PALETTE[rng.integers(len(PALETTE))] + rng.integers(-20, 21, size=3)


def draw_image(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB image of class `label`, all nuisance factors drawn from `rng`."""
    big = size * OVERSAMPLE
    # Background: one palette colour, its brightness ramping by up to +-25% along a random
    # direction (a plain background, so the shape is the most distinctive thing in the picture).
    base = _colour(rng)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:big, 0:big] / big
    ramp = (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta)
    bg = base * (1 + rng.uniform(0, 0.5) * ramp)[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)

    # The shape: a colour far enough from the background's mean to stay visible.
    fg = _colour(rng)
    while np.abs(fg - base).sum() < 150:
        fg = _colour(rng)
    r = rng.uniform(0.22, 0.38) * big
    cx, cy = rng.uniform(r + 1, big - r - 1, size=2)
    angle = rng.uniform(-0.3, 0.3)
    kind = CLASSES[label]
    if kind == "disk":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(fg))
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=tuple(fg), width=int(0.35 * r))
    elif kind == "frame":
        (outer,) = _polygon("square", cx, cy, r, angle)
        draw.polygon(outer, outline=tuple(fg), width=int(0.35 * r))
    else:
        for poly in _polygon(kind, cx, cy, r, angle):
            draw.polygon(poly, fill=tuple(fg))

    img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    noise = rng.normal(0, 8, size=(size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.SMOOTH) if rng.random() < 0.3 else Image.fromarray(arr)


NAME_PREFIX = "shapes-"
SPLITS = ("train", "val")
COMPLETE = ".complete"     # written last: its presence means the dataset folder is whole


def dataset_name(train_per_class: int, val_per_class: int, image_size: int) -> str:
    key = f"v{VERSION}-{train_per_class}-{val_per_class}-{image_size}"
    return f"{NAME_PREFIX}{image_size}px-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def is_embedded_split(path: Path, cache_dir: str) -> bool:
    """Whether `path` is a split (train/ or val/) of a complete embedded dataset under `cache_dir`."""
    if not cache_dir:
        return False
    cache = Path(os.path.expanduser(cache_dir)).resolve()
    path = path.resolve()
    return (path.name in SPLITS and path.parent.parent == cache and path.parent.name.startswith(NAME_PREFIX)
            and (path.parent / COMPLETE).exists())


def write_split(root: Path, split: str, per_class: int, image_size: int) -> None:
    split_id = SPLITS.index(split)
    for label, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            index = i * len(CLASSES) + label
            rng = np.random.default_rng([SEED, split_id, index])
            draw_image(label, rng, image_size).save(folder / f"{index:06d}.jpg", quality=90)


def ensure_embedded_dataset(cache_dir: str = "~/.cache/fastssl", train_per_class: int = 200,
                            val_per_class: int = 50, image_size: int = 32, log=print) -> Tuple[Path, Path]:
    """Return (train_dir, val_dir) of the embedded dataset, generating it on first use."""
    if image_size < 8:
        raise ValueError(f"data.embedded_image_size: must be at least 8 pixels, got {image_size}")
    cache = Path(os.path.expanduser(cache_dir))
    root = cache / dataset_name(train_per_class, val_per_class, image_size)
    if not (root / COMPLETE).exists():
        cache.mkdir(parents=True, exist_ok=True)
        n = (train_per_class + val_per_class) * len(CLASSES)
        log(f"writing the embedded dataset ({n} JPEGs, {image_size}px) to {root} ...")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + root.name, dir=cache))
        try:
            write_split(tmp, "train", train_per_class, image_size)
            write_split(tmp, "val", val_per_class, image_size)
            (tmp / COMPLETE).touch()
            if root.exists():        # a stale, incomplete folder from an older interrupted write
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root / "train", root / "val"

"""`fastssl show`: one PNG of a training batch as the model receives it.

Two-view methods show each augmented view; pretext tasks show their inputs next to their labels
and, with a checkpoint, the model's predictions (jigsaw tiles with their permutation, patch
pairs with their position, L next to the ab target and the prediction, masked input next to the
reconstruction, low-resolution input next to the output). People would rather look than read.
"""
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fastssl.config import Config
from fastssl.data import build_loader, resolve_paths
from fastssl.methods import build_augment, build_method, view_crops
from fastssl.methods.pretext import EVAL_SEED, Normalizer, Row
from fastssl.train.trainer import augment_generator

CELL = 64          # every picture is shown at this side (nearest-neighbour scaling keeps pixels sharp)
TITLE_HEIGHT, CAPTION_HEIGHT, MARGIN = 16, 12, 4


@torch.no_grad()
def batch_rows(cfg: Config, state: Optional[dict] = None, count: int = 8) -> List[Row]:
    """The rows of pictures for `count` training images: the loader's crops, the step-0
    augmentation, then what the method makes of them (its weights from `state` when given)."""
    augment = build_augment(cfg)
    method = build_method(cfg)
    if state is not None:
        method.load_state_dict(state["model"])
    method.eval()
    train_dir, _ = resolve_paths(cfg.data, log=lambda *_: None)
    loader = build_loader(cfg.data, train_dir, size=cfg.augment.size, batch_size=count, seed=cfg.train.seed,
                          views=view_crops(augment), train=True)
    loader.set_epoch(0)
    views, _, _ = next(iter(loader))
    generator = augment_generator(cfg.train.seed, 0)
    x = [view.apply(v, view.sample(v.shape[0], generator)) for view, v in zip(augment.views, views)]
    if not method.pretext_tasks():
        return [(f"view {i + 1} ({view.size} px)", Normalizer(view.mean, view.std).inverse(v), None)
                for i, (view, v) in enumerate(zip(augment.views, x))]
    images, rows = method.images(x), []
    task_generator = torch.Generator().manual_seed(EVAL_SEED)
    for task, backbone in method.pretext_tasks():
        rows += [(f"{task.name}: {title}", pictures, captions)
                 for title, pictures, captions in task.show(backbone, images, task_generator)]
    return rows


def render(rows: List[Row]) -> Image.Image:
    """One image: per row a title line, then its pictures side by side, each with its caption."""
    width = MARGIN + max(len(pictures) for _, pictures, _ in rows) * (CELL + MARGIN)
    row_height = TITLE_HEIGHT + CELL + CAPTION_HEIGHT + MARGIN
    canvas = Image.new("RGB", (max(width, 480), len(rows) * row_height + MARGIN), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (title, pictures, captions) in enumerate(rows):
        top = MARGIN + r * row_height
        draw.text((MARGIN, top), title, fill=(0, 0, 0))
        scaled = F.interpolate(pictures.detach().float().cpu().clamp(0, 1), size=(CELL, CELL), mode="nearest")
        for i, picture in enumerate(scaled):
            left = MARGIN + i * (CELL + MARGIN)
            array = (picture.permute(1, 2, 0) * 255).round().byte().numpy()
            canvas.paste(Image.fromarray(array), (left, top + TITLE_HEIGHT))
            if captions:
                draw.text((left, top + TITLE_HEIGHT + CELL), captions[i][:12], fill=(80, 80, 80))
    return canvas


def write_show(cfg: Config, out, state: Optional[dict] = None, count: int = 8) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render(batch_rows(cfg, state, count)).save(out)
    return out

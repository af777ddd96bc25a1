"""Jigsaw puzzles (Noroozi & Favaro 2016, arXiv 1603.09246): a 3x3 grid of tiles, shuffled by
one of a fixed set of permutations; the network names the permutation.

Shortcuts are closed as in the paper: tiles are separated by a gap and shifted at random inside
their cells (no edge continuation, no alignment), and each tile is standardised on its own (no
shared low-level statistics). The permutation set is chosen greedily for maximal minimum
Hamming distance, deterministically from its seed, and kept as a buffer (saved in every
checkpoint). One backbone encodes the nine tiles; their features, concatenated in the shuffled
order, go to the classifier over the permutations.
"""
import functools
from typing import List

import torch
import torch.nn.functional as F

from fastssl.config import Config
from fastssl.methods.pretext import ClassificationTask, PretextMethod, Row, classifier
from fastssl.pretext.patches import hamming_permutations, jigsaw_tiles, sample_jigsaw

GRID = 3


@functools.lru_cache(maxsize=4)
def permutation_set(count: int, seed: int) -> torch.Tensor:
    """The permutation set (cached: the selection scans all 9! permutations once per set)."""
    return hamming_permutations(count, GRID * GRID, seed)


def grid_geometry(side: int, gap: float, jitter: float):
    """(gap, jitter) in pixels for a square of `side`: fractions of the cell, at least 1 px each."""
    cell = side // GRID
    return max(1, round(gap * cell)), max(1, round(jitter * cell))


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """The images at `size` px (0 or their own size: unchanged)."""
    if not size or size == images.shape[-1]:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class JigsawTask(ClassificationTask):
    name = "jigsaw"

    def __init__(self, cfg: Config, feature_dim: int):
        super().__init__(cfg, feature_dim)
        self.settings = s = cfg.method.jigsaw
        self.register_buffer("permutations", permutation_set(s.permutations, s.permutation_seed).clone())
        self.classes = s.permutations
        self.head = classifier(GRID * GRID * feature_dim, s.hidden_dim, self.classes)

    def puzzles(self, images: torch.Tensor, generator: torch.Generator):
        """(shuffled tiles (N, 9, 3, t, t), labels (N,)) from [0, 1] images."""
        s = self.settings
        x = resized(images, s.input_size)
        gap, jitter = grid_geometry(x.shape[-1], s.gap, s.jitter)
        params = sample_jigsaw(x.shape[0], len(self.permutations), GRID, jitter, generator)
        tiles = jigsaw_tiles(x, params, self.permutations, grid=GRID, gap=gap, jitter=jitter, normalize=True)
        return tiles, params["labels"].to(x.device)

    def classify(self, backbone, images: torch.Tensor, generator: torch.Generator):
        tiles, labels = self.puzzles(images, generator)
        features = backbone(tiles.flatten(0, 1))                        # (9N, D), tiles in shuffled order
        return self.head(features.view(tiles.shape[0], -1)), labels, tiles

    @torch.no_grad()
    def show(self, backbone, images: torch.Tensor, generator: torch.Generator) -> List[Row]:
        logits, labels, tiles = self.classify(backbone, images, generator)
        pred = logits.argmax(1)
        rows = []
        for i in range(min(4, tiles.shape[0])):
            # Standardised tiles, rescaled per tile to [0, 1] for display.
            t = tiles[i]
            low, high = t.amin(dim=(1, 2, 3), keepdim=True), t.amax(dim=(1, 2, 3), keepdim=True)
            perm = self.permutations[labels[i]].tolist()
            rows.append((f"image {i}: tiles in shuffled order, permutation {int(labels[i])} = {perm} "
                         f"(pred {int(pred[i])})", (t - low) / (high - low + 1e-6), [f"tile {p}" for p in perm]))
        return rows


class Jigsaw(PretextMethod):
    name = "jigsaw"
    task_class = JigsawTask

"""Patch-based pretext tasks on batched tensors: sample parameters, then apply them.

- Rotation (Gidaris, Singh, Komodakis 2018, "Unsupervised Representation Learning by Predicting
  Image Rotations"): every image in its four rotations, label k = k x 90 degrees counter-clockwise.
- Jigsaw (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving
  Jigsaw Puzzles"): a grid x grid set of tiles shuffled by one of a fixed set of permutations
  chosen greedily for large Hamming distance; the label is the permutation's index.
- Relative position (Doersch, Gupta, Efros 2015, "Unsupervised Visual Representation Learning by
  Context Prediction"): the centre patch of a 3 x 3 grid and one of its 8 neighbours; the label
  is the neighbour's index in NEIGHBOURS.

Grid geometry shared by jigsaw and relative position: a square crop of side S is cut in
grid x grid cells of side cell = S // grid (the remainder on the right/bottom is unused). A tile
has side t = cell - gap - jitter and starts at offset gap // 2 + j inside its cell, j drawn in
[0, jitter] per image, tile and axis. Neighbouring tiles are then >= gap pixels apart (no edge
continuation to match) and not aligned on a lattice (no alignment shortcut).

`sample_*` functions draw every random choice on the CPU from a torch.Generator; the apply
functions are pure, batched (index arithmetic, no loop over images) and run on x's device.
"""
import functools
import math
from typing import Dict

import numpy as np
import torch

# (row, col) of the 8 neighbours of the centre cell (1, 1); the relative-position label indexes this.
NEIGHBOURS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))
CHROMA_MODES = ("drop", "project", "none")
# The green-magenta axis; chromatic aberration shifts green against red/blue (Doersch et al. 3.1).
GREEN_MAGENTA = (-1 / math.sqrt(6), 2 / math.sqrt(6), -1 / math.sqrt(6))
NOISE_SCALE = 0.01   # "drop": noise std as a fraction of the kept channel's range in the patch


def _check_square(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected square images (N, C, S, S), got shape {tuple(x.shape)}")


def tile_side(size: int, grid: int, gap: int, jitter: int) -> int:
    """Side t of a tile cut from a size x size crop; ValueError when the geometry leaves no pixel."""
    if grid < 1 or gap < 0 or jitter < 0:
        raise ValueError(f"need grid >= 1, gap >= 0, jitter >= 0; got grid={grid}, gap={gap}, jitter={jitter}")
    t = size // grid - gap - jitter
    if t < 1:
        raise ValueError(f"crop of side {size} too small: cell {size} // {grid} = {size // grid} minus "
                         f"gap {gap} and jitter {jitter} leaves tile side {t} < 1")
    return t


def _cut(x: torch.Tensor, starts: torch.Tensor, t: int) -> torch.Tensor:
    """Cut tiles: x (N, C, S, S), starts (N, K, 2) top-left (row, col) -> (N, K, C, t, t)."""
    r = torch.arange(t, device=x.device)
    rows = starts[..., 0, None] + r                       # (N, K, t)
    cols = starts[..., 1, None] + r                       # (N, K, t)
    n = torch.arange(x.shape[0], device=x.device)[:, None, None, None]
    # Advanced indices around a slice: the indexed dims come first -> (N, K, t, t, C).
    tiles = x[n, :, rows[..., :, None], cols[..., None, :]]
    return tiles.permute(0, 1, 4, 2, 3)


def _checked_offsets(params: Dict[str, torch.Tensor], n: int, jitter: int, device) -> torch.Tensor:
    offsets = params["offsets"]
    if offsets.shape[0] != n:
        raise ValueError(f"{n} images but parameters for {offsets.shape[0]}")
    # An offset beyond the jitter would push a tile out of its cell (or out of the image).
    if offsets.numel() and (offsets.min() < 0 or offsets.max() > jitter):
        raise ValueError(f"offsets must lie in [0, jitter={jitter}], got max {int(offsets.max())}")
    return offsets.to(device)


# ---------------------------------------------------------------------------- rotation

def rotate_batch(x: torch.Tensor):
    """(N, C, S, S) -> (4N, C, S, S) all four rotations, labels (4N,): [all k=0, all k=1, ...]."""
    _check_square(x)
    x4 = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return x4, labels


def unrotate(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Undo rotations: image i, rotated by labels[i] x 90 degrees, is rotated back (same shape)."""
    _check_square(x)
    labels = labels.to(x.device)
    out = x.clone()
    for k in range(1, 4):
        idx = (labels == k).nonzero().squeeze(1)
        if idx.numel():
            out.index_copy_(0, idx, torch.rot90(x[idx], -k, dims=(-2, -1)))
    return out


# ---------------------------------------------------------------------------- jigsaw

@functools.lru_cache(maxsize=2)
def _all_permutations(cells: int) -> np.ndarray:
    """Every permutation of range(cells) in lexicographic order, transposed: uint8 (cells, cells!)."""
    perms = np.zeros((1, 0), dtype=np.uint8)
    for m in range(1, cells + 1):
        # Lexicographic perms of m items: first item f, then the perms of m-1 items with the
        # values >= f shifted up by one (they skip f).
        perms = np.concatenate([np.concatenate([np.full((len(perms), 1), f, np.uint8), perms + (perms >= f)], 1)
                                for f in range(m)])
    table = np.ascontiguousarray(perms.T)
    table.flags.writeable = False
    return table


def hamming_permutations(count: int, cells: int = 9, seed: int = 0) -> torch.Tensor:
    """Greedy set of `count` permutations of range(cells) with a large minimum Hamming distance.

    Starts from a random permutation, then keeps adding the permutation whose minimum Hamming
    distance to the chosen set is largest (Noroozi & Favaro, Sec. 3.2, "maximal" set; their
    Algorithm 1 scores by the summed distance, here by the minimum). Ties are broken by a numpy
    Generator seeded with `seed`, so the set is a deterministic function of (count, cells, seed).
    Returns a LongTensor (count, cells).
    """
    if not 1 <= cells <= 10:
        raise ValueError(f"cells must lie in [1, 10] (cells! permutations are enumerated), got {cells}")
    total = math.factorial(cells)
    if not 2 <= count <= total:
        raise ValueError(f"count must lie in [2, {cells}! = {total}], got {count}")
    table = _all_permutations(cells)                      # (cells, total) uint8
    rng = np.random.default_rng(seed)
    # Running minimum distance of every permutation to the chosen set (0 for chosen ones).
    min_dist = np.full(total, cells, dtype=np.uint8)
    dist = np.empty(total, dtype=np.uint8)
    chosen = [int(rng.integers(total))]
    while True:
        p = table[:, chosen[-1]]
        dist.fill(0)
        for i in range(cells):
            dist += table[i] != p[i]
        np.minimum(min_dist, dist, out=min_dist)
        if len(chosen) == count:
            break
        best = np.flatnonzero(min_dist == min_dist.max())
        chosen.append(int(best[rng.integers(len(best))]))
    return torch.from_numpy(table[:, chosen].T.astype(np.int64))


def min_hamming(perms) -> int:
    """Smallest Hamming distance between two distinct rows of perms (P, cells), P >= 2."""
    p = torch.as_tensor(perms)
    if p.dim() != 2 or p.shape[0] < 2:
        raise ValueError(f"need at least 2 permutations (P, cells), got shape {tuple(p.shape)}")
    d = (p[:, None, :] != p[None, :, :]).sum(-1)         # (P, P)
    d.fill_diagonal_(p.shape[1] + 1)
    return int(d.min())


def sample_jigsaw(n: int, perms_count: int, grid: int, jitter: int,
                  generator: torch.Generator = None) -> Dict[str, torch.Tensor]:
    """Draw tile offsets (n, grid*grid, 2) in [0, jitter] (row, col) and permutation labels (n,)."""
    if jitter < 0 or perms_count < 1:
        raise ValueError(f"need jitter >= 0 and perms_count >= 1, got jitter={jitter}, perms_count={perms_count}")
    return {
        "offsets": torch.randint(0, jitter + 1, (n, grid * grid, 2), generator=generator),
        "labels": torch.randint(0, perms_count, (n,), generator=generator),
    }


def jigsaw_tiles(x: torch.Tensor, params: Dict[str, torch.Tensor], perms: torch.Tensor, grid: int = 3, *,
                 gap: int, jitter: int, normalize: bool = True) -> torch.Tensor:
    """Cut and shuffle: x (N, C, S, S) -> tiles (N, grid*grid, C, t, t).

    Output position k holds original tile perms[label][k] (tiles numbered row-major), cut at the
    sampled offset of that original tile. normalize=True standardises each tile per channel
    (Noroozi & Favaro: removes low-level statistics shared by neighbouring tiles).
    """
    _check_square(x)
    t = tile_side(x.shape[-1], grid, gap, jitter)
    perms = torch.as_tensor(perms, dtype=torch.long, device=x.device)
    if perms.dim() != 2 or perms.shape[1] != grid * grid:
        raise ValueError(f"perms must be (P, {grid * grid}) for grid {grid}, got shape {tuple(perms.shape)}")
    offsets = _checked_offsets(params, x.shape[0], jitter, x.device)   # (N, K, 2)
    src = perms[params["labels"].to(x.device)]                          # (N, K): original tile index
    cell = x.shape[-1] // grid
    corner = torch.stack([src // grid, src % grid], -1) * cell + gap // 2     # (N, K, 2)
    starts = corner + torch.gather(offsets, 1, src[..., None].expand(-1, -1, 2))
    tiles = _cut(x, starts, t)
    if normalize:
        mean = tiles.mean(dim=(-2, -1), keepdim=True)
        std = tiles.std(dim=(-2, -1), correction=0, keepdim=True)
        tiles = (tiles - mean) / (std + 1e-5)
    return tiles


def assemble_tiles(tiles: torch.Tensor, labels: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Undo the shuffle: tiles (N, K, C, t, t) at positions perms[label] -> original row-major order."""
    perms = torch.as_tensor(perms, dtype=torch.long, device=tiles.device)
    inverse = torch.argsort(perms[labels.to(tiles.device)], dim=1)     # (N, K): where tile i went
    n = torch.arange(tiles.shape[0], device=tiles.device)[:, None]
    return tiles[n, inverse]


# ---------------------------------------------------------------------------- relative position

def sample_patch_pairs(n: int, jitter: int, generator: torch.Generator = None,
                       chroma: str = "drop") -> Dict[str, torch.Tensor]:
    """Draw neighbour labels (n,), offsets (n, 2, 2) [centre, neighbour] x (row, col) in [0, jitter].

    chroma="drop" adds `keep` (n, 2): the channel kept in each patch, and `noise_seed` (a 0-dim
    long tensor) that seeds the Gaussian noise replacing the two dropped channels.
    """
    if chroma not in CHROMA_MODES:
        raise ValueError(f"unknown chroma mode {chroma!r}; choose one of: {', '.join(CHROMA_MODES)}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    params = {
        "labels": torch.randint(0, len(NEIGHBOURS), (n,), generator=generator),
        "offsets": torch.randint(0, jitter + 1, (n, 2, 2), generator=generator),
    }
    if chroma == "drop":
        params["keep"] = torch.randint(0, 3, (n, 2), generator=generator)
        params["noise_seed"] = torch.randint(0, 2 ** 62, (), generator=generator)
    return params


def patch_pairs(x: torch.Tensor, params: Dict[str, torch.Tensor], gap: int, jitter: int,
                chroma: str = "drop"):
    """x (N, C, S, S) -> (centre, neighbour), each (N, C, t, t), on a 3 x 3 grid.

    Chromatic-aberration guard (Doersch et al. 3.1): "drop" keeps channel `keep` of each patch
    and replaces the other two with zero-mean Gaussian noise of std NOISE_SCALE x the kept
    channel's range in that patch; "project" removes every pixel's green-magenta component
    (x - (x.a) a, a = GREEN_MAGENTA); "none" leaves colour alone. "drop"/"project" need C = 3.
    """
    if chroma not in CHROMA_MODES:
        raise ValueError(f"unknown chroma mode {chroma!r}; choose one of: {', '.join(CHROMA_MODES)}")
    _check_square(x)
    if chroma != "none" and x.shape[1] != 3:
        raise ValueError(f"chroma={chroma!r} needs 3 colour channels, got {x.shape[1]}")
    if chroma == "drop" and "keep" not in params:
        raise ValueError("chroma='drop' needs parameters drawn by sample_patch_pairs(..., chroma='drop')")
    t = tile_side(x.shape[-1], 3, gap, jitter)
    offsets = _checked_offsets(params, x.shape[0], jitter, x.device)   # (N, 2, 2)
    where = torch.tensor(NEIGHBOURS, device=x.device)[params["labels"].to(x.device)]   # (N, 2)
    cells = torch.stack([torch.ones_like(where), where], 1)             # (N, 2, 2): centre (1, 1), neighbour
    patches = _cut(x, cells * (x.shape[-1] // 3) + gap // 2 + offsets, t)   # (N, 2, C, t, t)
    if chroma == "drop":
        keep = params["keep"].to(x.device)                              # (N, 2)
        kept = torch.gather(patches, 2, keep[:, :, None, None, None].expand(-1, -1, 1, t, t))   # (N, 2, 1, t, t)
        spread = kept.amax(dim=(-2, -1), keepdim=True) - kept.amin(dim=(-2, -1), keepdim=True)
        g = torch.Generator().manual_seed(int(params["noise_seed"]))
        noise = torch.randn(patches.shape, generator=g, dtype=patches.dtype).to(x.device)
        is_kept = torch.arange(3, device=x.device)[:, None, None] == keep[:, :, None, None, None]
        patches = torch.where(is_kept, patches, NOISE_SCALE * spread * noise)
    elif chroma == "project":
        a = torch.tensor(GREEN_MAGENTA, device=x.device, dtype=patches.dtype)[:, None, None]   # (3, 1, 1)
        patches = patches - (patches * a).sum(2, keepdim=True) * a
    return patches[:, 0], patches[:, 1]

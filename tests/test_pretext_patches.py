"""Patch pretext tasks: labels right by construction, batched == per-image reference, shortcuts closed."""
import itertools
import math

import pytest
import torch

from fastssl.pretext.patches import (
    GREEN_MAGENTA, NEIGHBOURS, assemble_tiles, hamming_permutations, jigsaw_tiles, min_hamming,
    patch_pairs, rotate_batch, sample_jigsaw, sample_patch_pairs, tile_side, unrotate,
)

PERMS = hamming_permutations(30, seed=3)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def coords(n, s):
    """(n, 3, s, s) images whose channels 0/1 hold each pixel's row/col, channel 2 the image index."""
    r = torch.arange(s, dtype=torch.float32)
    img = torch.stack([r[:, None].expand(s, s), r[None, :].expand(s, s), torch.zeros(s, s)])
    out = img.repeat(n, 1, 1, 1)
    out[:, 2] = torch.arange(n, dtype=torch.float32)[:, None, None]
    return out


# ---------------------------------------------------------------------------- rotation

def test_rotate_batch_order_and_unrotate():
    x = torch.randn(3, 2, 7, 7, generator=gen())
    x4, labels = rotate_batch(x)
    assert x4.shape == (12, 2, 7, 7)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert torch.equal(x4[3:6], torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(unrotate(x4, labels), x.repeat(4, 1, 1, 1))
    # Any label order: rotate each image by its own k, then undo.
    k = torch.tensor([3, 0, 2])
    rotated = torch.stack([torch.rot90(x[i], int(k[i]), dims=(-2, -1)) for i in range(3)])
    assert torch.equal(unrotate(rotated, k), x)


def test_four_rotations_of_asymmetric_image_differ():
    x4, _ = rotate_batch(torch.arange(25.0).view(1, 1, 5, 5))
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.equal(x4[a], x4[b])
    # Counter-clockwise: the top-right pixel moves to the top-left.
    assert x4[1, 0, 0, 0] == 4


def test_rotation_rejects_non_square():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\)"):
        rotate_batch(torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\(3, 4, 4\)"):
        unrotate(torch.zeros(3, 4, 4), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------- permutations

def test_hamming_permutations_min_distance_matches_brute_force():
    perms = hamming_permutations(100)
    assert perms.shape == (100, 9) and perms.dtype == torch.long
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    assert len({tuple(p) for p in perms.tolist()}) == 100
    brute = min(sum(u != v for u, v in zip(p, q)) for p, q in itertools.combinations(perms.tolist(), 2))
    assert min_hamming(perms) == brute == 6


def test_hamming_permutations_deterministic_from_seed():
    assert torch.equal(hamming_permutations(20, seed=5), hamming_permutations(20, seed=5))
    assert not torch.equal(hamming_permutations(20, seed=5), hamming_permutations(20, seed=6))


def test_hamming_permutations_full_set_and_count_validation():
    full = hamming_permutations(24, cells=4)
    assert len({tuple(p) for p in full.tolist()}) == 24
    for bad in (1, 25):
        with pytest.raises(ValueError, match=str(bad)):
            hamming_permutations(bad, cells=4)
    with pytest.raises(ValueError, match="362881"):
        hamming_permutations(math.factorial(9) + 1)
    assert min_hamming([[0, 1, 2], [1, 0, 2], [2, 0, 1]]) == 2


# ---------------------------------------------------------------------------- jigsaw

def reference_jigsaw(x, params, perms, grid, gap, jitter, normalize):
    """Per-image loop: cut every tile at its cell + gap // 2 + offset, then order by the permutation."""
    cell = x.shape[-1] // grid
    t = cell - gap - jitter
    out = []
    for i in range(x.shape[0]):
        tiles = []
        for k in range(grid * grid):
            dy, dx = params["offsets"][i, k].tolist()
            r0, c0 = (k // grid) * cell + gap // 2 + dy, (k % grid) * cell + gap // 2 + dx
            tile = x[i, :, r0:r0 + t, c0:c0 + t]
            if normalize:
                std = tile.std((-2, -1), correction=0, keepdim=True)
                tile = (tile - tile.mean((-2, -1), keepdim=True)) / (std + 1e-5)
            tiles.append(tile)
        out.append(torch.stack([tiles[j] for j in perms[params["labels"][i]].tolist()]))
    return torch.stack(out)


@pytest.mark.parametrize("n,s,grid,gap,jitter", [(1, 31, 3, 2, 3), (5, 37, 3, 1, 2), (5, 31, 2, 3, 0)])
@pytest.mark.parametrize("normalize", [False, True])
def test_jigsaw_matches_reference_loop(n, s, grid, gap, jitter, normalize):
    x = torch.rand(n, 3, s, s, generator=gen(1))
    perms = PERMS if grid == 3 else hamming_permutations(12, cells=4)
    params = sample_jigsaw(n, len(perms), grid, jitter, gen(2))
    tiles = jigsaw_tiles(x, params, perms, grid, gap=gap, jitter=jitter, normalize=normalize)
    t = tile_side(s, grid, gap, jitter)
    assert tiles.shape == (n, grid * grid, 3, t, t)
    torch.testing.assert_close(tiles, reference_jigsaw(x, params, perms, grid, gap, jitter, normalize),
                               rtol=0, atol=1e-5 if normalize else 0)


def test_assembled_tiles_are_the_tiles_cut_at_the_sampled_offsets():
    x = torch.rand(4, 2, 31, 31, generator=gen(3))
    params = sample_jigsaw(4, len(PERMS), 3, 2, gen(4))
    tiles = jigsaw_tiles(x, params, PERMS, gap=2, jitter=2, normalize=False)
    assembled = assemble_tiles(tiles, params["labels"], PERMS)
    unshuffled = reference_jigsaw(x, {**params, "labels": torch.zeros(4, dtype=torch.long)},
                                  torch.arange(9)[None], 3, 2, 2, False)
    assert torch.equal(assembled, unshuffled)
    assert not torch.equal(tiles, assembled)   # the labels did shuffle something


def test_jigsaw_tiles_never_touch_and_offsets_vary():
    n, s, gap, jitter = 200, 27, 2, 2
    t = tile_side(s, 3, gap, jitter)
    params = sample_jigsaw(n, len(PERMS), 3, jitter, gen(5))
    tiles = assemble_tiles(jigsaw_tiles(coords(n, s), params, PERMS, gap=gap, jitter=jitter, normalize=False),
                           params["labels"], PERMS).view(n, 3, 3, 3, t, t)
    rows, cols = tiles[:, :, :, 0], tiles[:, :, :, 1]            # (n, 3, 3, t, t)
    # Empty pixels between horizontally / vertically adjacent tiles: first col - last col - 1.
    h_gap = cols[:, :, 1:, 0, 0] - cols[:, :, :-1, 0, -1] - 1
    v_gap = rows[:, 1:, :, 0, 0] - rows[:, :-1, :, -1, 0] - 1
    assert h_gap.min() == gap and v_gap.min() == gap              # reached, never undercut
    assert h_gap.max() == gap + 2 * jitter
    assert len(params["offsets"].unique()) == jitter + 1


def test_tile_normalisation_standardises_each_tile_and_channel():
    x = 5 * torch.rand(3, 3, 31, 31, generator=gen(6)) + 2
    tiles = jigsaw_tiles(x, sample_jigsaw(3, len(PERMS), 3, 1, gen(7)), PERMS, gap=1, jitter=1)
    torch.testing.assert_close(tiles.mean((-2, -1)), torch.zeros(3, 9, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(tiles.std((-2, -1), correction=0), torch.ones(3, 9, 3), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- relative position

def test_patch_pair_neighbour_matches_label():
    n, s, gap, jitter = 64, 28, 2, 2
    assert NEIGHBOURS == ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))   # row-major, centre skipped
    t = tile_side(s, 3, gap, jitter)
    params = sample_patch_pairs(n, jitter, gen(8), chroma="none")
    centre, neighbour = patch_pairs(coords(n, s), params, gap, jitter, chroma="none")
    assert set(params["labels"].tolist()) == set(range(8))
    for i, label in enumerate(params["labels"].tolist()):
        assert centre[i, 2].eq(i).all() and neighbour[i, 2].eq(i).all()   # each pair from its own image
        dr, dc = NEIGHBOURS[label][0] - 1, NEIGHBOURS[label][1] - 1
        drow = neighbour[i, 0, 0, 0] - centre[i, 0, 0, 0]
        dcol = neighbour[i, 1, 0, 0] - centre[i, 1, 0, 0]
        for delta, d in ((drow, dr), (dcol, dc)):
            if d:   # other row/column: on that side, with >= gap empty pixels in between
                assert int(torch.sign(delta)) == d and abs(delta) >= t + gap
            else:   # same row/column: only the jitter tells them apart
                assert abs(delta) <= jitter


def reference_pair(x, params, gap, jitter, chroma):
    """Per-image loop over the same draws; "drop" regenerates the whole seeded noise tensor."""
    n, c, s, _ = x.shape
    cell, t = s // 3, s // 3 - gap - jitter
    if chroma == "drop":
        noise = torch.randn((n, 2, c, t, t), generator=gen(int(params["noise_seed"])))
    a = torch.tensor(GREEN_MAGENTA)
    out = []
    for i in range(n):
        pair = []
        for j, (r, col) in enumerate([(1, 1), NEIGHBOURS[int(params["labels"][i])]]):
            dy, dx = params["offsets"][i, j].tolist()
            r0, c0 = r * cell + gap // 2 + dy, col * cell + gap // 2 + dx
            p = x[i, :, r0:r0 + t, c0:c0 + t].clone()
            if chroma == "drop":
                k = int(params["keep"][i, j])
                kept = p[k].clone()
                p = 0.01 * (kept.max() - kept.min()) * noise[i, j]
                p[k] = kept
            elif chroma == "project":
                p = p - torch.einsum("chw,c->hw", p, a) * a[:, None, None]
            pair.append(p)
        out.append(torch.stack(pair))
    out = torch.stack(out)
    return out[:, 0], out[:, 1]


@pytest.mark.parametrize("chroma", ["drop", "project", "none"])
@pytest.mark.parametrize("n,s,gap,jitter", [(1, 31, 3, 2), (5, 37, 2, 3)])
def test_patch_pairs_match_reference_loop(chroma, n, s, gap, jitter):
    x = torch.rand(n, 3, s, s, generator=gen(9))
    params = sample_patch_pairs(n, jitter, gen(10), chroma=chroma)
    got = patch_pairs(x, params, gap, jitter, chroma=chroma)
    want = reference_pair(x, params, gap, jitter, chroma)
    for g, w in zip(got, want):
        assert g.shape == (n, 3, s // 3 - gap - jitter, s // 3 - gap - jitter)
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_project_removes_green_magenta_and_keeps_the_rest():
    x = torch.rand(4, 3, 31, 31, generator=gen(11))
    params = sample_patch_pairs(4, 2, gen(12), chroma="project")
    plain = patch_pairs(x, params, 2, 2, chroma="none")
    a = torch.tensor([-1.0, 2.0, -1.0])[:, None, None]
    for out, raw in zip(patch_pairs(x, params, 2, 2, chroma="project"), plain):
        assert (out * a).sum(1).abs().max() < 1e-5
        assert (raw * a).sum(1).abs().max() > 0.1               # the raw patches did have some
        torch.testing.assert_close(out.sum(1), raw.sum(1))      # (1, 1, 1) is orthogonal to a: kept


def test_drop_keeps_one_channel_and_replaces_the_others_with_faint_noise():
    x = torch.rand(6, 3, 31, 31, generator=gen(13))
    params = sample_patch_pairs(6, 2, gen(14), chroma="drop")
    raw = patch_pairs(x, params, 2, 2, chroma="none")
    for j, (out, ref) in enumerate(zip(patch_pairs(x, params, 2, 2, chroma="drop"), raw)):
        keep = params["keep"][:, j]
        for i in range(6):
            k = int(keep[i])
            assert torch.equal(out[i, k], ref[i, k])
            dropped = out[i, [c for c in range(3) if c != k]]
            assert 0 < dropped.std() < 0.02 and dropped.abs().max() < 0.1
    # Same draws, same output (the noise replays from its seed).
    assert torch.equal(patch_pairs(x, params, 2, 2)[0], patch_pairs(x, params, 2, 2)[0])


# ---------------------------------------------------------------------------- errors

def test_errors_name_the_offending_value():
    x = torch.rand(2, 3, 31, 31)
    jig = sample_jigsaw(2, len(PERMS), 3, 2, gen())
    with pytest.raises(ValueError, match="tile side -1"):
        jigsaw_tiles(torch.rand(2, 3, 12, 12), jig, PERMS, gap=3, jitter=2)
    with pytest.raises(ValueError, match=r"\(2, 3, 31, 30\)"):
        jigsaw_tiles(torch.rand(2, 3, 31, 30), jig, PERMS, gap=1, jitter=2)
    with pytest.raises(ValueError, match=r"\(30, 4\)"):
        jigsaw_tiles(x, jig, PERMS[:, :4], gap=1, jitter=2)
    with pytest.raises(ValueError, match="jitter=1"):
        jigsaw_tiles(x, jig, PERMS, gap=1, jitter=1)       # offsets drawn for jitter 2
    with pytest.raises(ValueError, match="'rgb'"):
        sample_patch_pairs(2, 1, gen(), chroma="rgb")
    pairs = sample_patch_pairs(2, 1, gen(), chroma="none")
    with pytest.raises(ValueError, match="'rgb'"):
        patch_pairs(x, pairs, 1, 1, chroma="rgb")
    with pytest.raises(ValueError, match="sample_patch_pairs"):
        patch_pairs(x, pairs, 1, 1, chroma="drop")
    with pytest.raises(ValueError, match="got 1"):
        patch_pairs(torch.rand(2, 1, 31, 31), pairs, 1, 1, chroma="project")
    with pytest.raises(ValueError, match="crop of side 8"):
        patch_pairs(torch.rand(2, 3, 8, 8), pairs, 1, 1, chroma="none")

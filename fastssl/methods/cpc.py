"""Contrastive Predictive Coding for images: CPC (van den Oord, Li, Vinyals 2018, arXiv 1807.03748,
Sec. 3.2) and CPC v2 (Hénaff et al. 2019, arXiv 1905.09272).

One view per image. The view (N, 3, S, S) is cut into a grid x grid set of patches that overlap
by half: stride s = S / (grid + 1), side p = 2s (grid 7: 64 px patches at stride 32 on a 256 px
crop, 8 px at stride 4 on a 32 px one). Each patch goes through the backbone on its own (one
batched call over the N * G * G patches): z (N, D, G, G). A row-causal context network over that
grid (`ContextNetwork`, after CPC v2's PixelCNN) gives c (N, D, G, G), where row i has seen only
rows <= i. For k = 1 .. prediction_steps a linear map W_k (a 1x1 conv) predicts, from the
context at row i, the embedding of the patch k rows below in the same column: W_k c[:, :, i, j]
~ z[:, :, i + k, j]. InfoNCE scores each prediction against every patch embedding of the batch
(the other patches of the same image and of the other images are the negatives), through
`fastssl.losses.info_nce_rows_cols`: rows and columns are L2-normalised inside, divided by
`method.cpc.temperature`, and gradients reach both the predictions and the targets, as in CPC.
The loss is the mean over all sum_k N (G - k) G predictions.

Evaluation (`eval_backbone`) encodes the same patch grid of a whole image and averages the G * G
patch features, as CPC's linear evaluation pools the grid; the exported weights are the plain
ResNet's (`input_note` says how they were used).

Under torchrun the negatives stay local to each rank (the rank's N * G * G patches): with 49
patches per image a rank's batch already holds thousands of candidates, and DDP averages the
gradients of the per-rank losses.
"""
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.config import Config, ConfigError
from fastssl.losses import info_nce_rows_cols
from fastssl.methods.base import Method, Output, Views, output_std

CONTEXT_WIDTH = 256          # inner width of each context block (CPC v2's PixelCNN bottleneck)
ACCURACY_QUERIES = 512       # the top-1 statistic scores at most this many predictions (no gradient)


# --- patches ---------------------------------------------------------------------------------------

def fitted_size(size: int, grid: int) -> int:
    """The side a view is resized to before cutting: the multiple of grid + 1 nearest to `size`
    (halves round up), at least grid + 1 (1 px stride, 2 px patches)."""
    cells = grid + 1
    return max(cells, (size + cells // 2) // cells * cells)


def patch_grid(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, G, G, C, p, p): the grid x grid patches of side p = 2s at stride s = S' / (grid + 1) of
    square `images` (N, C, S, S), patch [n, i, j] = image[n, :, i s : i s + p, j s : j s + p].

    When S is not a multiple of grid + 1 the images are first resized (bilinear, no antialiasing)
    to S' = `fitted_size(S, grid)`, so the patches cover the whole image. A strided view
    (`unfold`): no copy until the caller reshapes.
    """
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images (N, C, S, S), got shape {tuple(images.shape)}")
    side = fitted_size(images.shape[-1], grid)
    if side != images.shape[-1]:
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    stride = side // (grid + 1)
    patch = 2 * stride
    # unfold(2) then unfold(3): (N, C, G, G, p_rows, p_cols)
    return images.unfold(2, patch, stride).unfold(3, patch, stride).permute(0, 2, 3, 1, 4, 5)


def encode_grid(backbone: nn.Module, images: torch.Tensor, grid: int) -> torch.Tensor:
    """z (N, D, G, G): the backbone's pooled features of every patch, in one batched call."""
    patches = patch_grid(images, grid)
    n, g, _, c, p, _ = patches.shape
    flat = patches.reshape(n * g * g, c, p, p).contiguous(memory_format=torch.channels_last)
    return backbone(flat).reshape(n, g, g, -1).permute(0, 3, 1, 2)


# --- context and predictions -----------------------------------------------------------------------

class RowCausalBlock(nn.Module):
    """CPC v2's PixelCNN block: x + 1x1(ReLU(conv_2x3(ReLU(1x1(x))))), where the 2x3 convolution
    is padded on the top only, so output row i mixes input rows i - 1 and i (and the neighbouring
    columns of both): never a row below."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim, width, 1)
        self.mix = nn.Conv2d(width, width, (2, 3))
        self.expand = nn.Conv2d(width, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.reduce(x))
        h = F.relu(self.mix(F.pad(h, (1, 1, 1, 0))))      # (left, right, top, bottom)
        return x + self.expand(h)


class ContextNetwork(nn.Module):
    """c (N, D, G, G) from z (N, D, G, G): `layers` row-causal residual blocks and a ReLU. Row i of
    c depends on rows max(0, i - layers) .. i of z only."""

    def __init__(self, dim: int, layers: int, width: int = CONTEXT_WIDTH):
        super().__init__()
        self.blocks = nn.Sequential(*[RowCausalBlock(dim, width) for _ in range(layers)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(z))


def prediction_targets(n: int, grid: int, steps: int, device=None) -> torch.Tensor:
    """The positive column of every query, in the order of `predictions`: for each k = 1 .. steps,
    for each (image n, row i < G - k, column j), the key index of patch (n, i + k, j) among the
    N * G * G keys flattened as (n, row, column)."""
    out = []
    for k in range(1, steps + 1):
        image = torch.arange(n, device=device).view(-1, 1, 1)
        row = torch.arange(grid - k, device=device).view(1, -1, 1)
        col = torch.arange(grid, device=device).view(1, 1, -1)
        out.append((image * grid * grid + (row + k) * grid + col).flatten())
    return torch.cat(out)


def predictions(context: torch.Tensor, predictors: Sequence[nn.Module]) -> torch.Tensor:
    """Queries (sum_k N (G - k) G, D): W_k over the context rows 0 .. G - k - 1 (the rows that have a
    target k rows below), for k = 1 .. len(predictors), each flattened as (n, row, column)."""
    g = context.shape[-2]
    out = []
    for k, w in enumerate(predictors, start=1):
        out.append(w(context[:, :, :g - k]).permute(0, 2, 3, 1).flatten(0, 2))
    return torch.cat(out)


def cpc_loss(z: torch.Tensor, context: torch.Tensor, predictors: Sequence[nn.Module], temperature: float,
             backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, queries, keys, positive): InfoNCE of every prediction against all N G G patch
    embeddings of `z` (N, D, G, G), the target patch being the positive."""
    n, _, g, _ = z.shape
    queries = predictions(context, predictors).float()
    keys = z.permute(0, 2, 3, 1).flatten(0, 2).float()                        # (N G G, D)
    positive = prediction_targets(n, g, len(predictors), z.device)
    loss = info_nce_rows_cols(queries, keys, positive, temperature, backend=backend)
    return loss, queries, keys, positive


@torch.no_grad()
def top1_accuracy(queries: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor,
                  limit: int = ACCURACY_QUERIES) -> float:
    """Share of the queries whose most similar key (cosine) is their target, over at most `limit`
    evenly spaced queries (the full R x C logits would cost as much as the loss again)."""
    stride = max(1, -(-queries.shape[0] // limit))
    q = F.normalize(queries[::stride].detach(), dim=1)
    k = F.normalize(keys.detach(), dim=1)
    return ((q @ k.T).argmax(dim=1) == positive[::stride]).float().mean().item()


# --- evaluation ------------------------------------------------------------------------------------

class PatchGridPooling(nn.Module):
    """The evaluated backbone of a CPC model: an image -> its patch grid -> the backbone's feature of
    each patch -> their mean (N, D). The ResNet's weights are under `net.`."""

    def __init__(self, backbone: nn.Module, grid: int):
        super().__init__()
        self.net, self.grid = backbone, grid
        self.input_note = (f"CPC features: the image (resized to the nearest multiple of {grid + 1} px) is cut "
                           f"into {grid} x {grid} patches overlapping by half (side 2S/{grid + 1}, stride "
                           f"S/{grid + 1}); each patch goes through the network and the {grid * grid} "
                           "pooled features are averaged")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return encode_grid(self.net, x, self.grid).mean(dim=(2, 3))


# --- the method ------------------------------------------------------------------------------------

class CPC(Method):
    name = "cpc"

    def __init__(self, cfg: Config):
        s = cfg.method.cpc
        if s.grid < 2:
            raise ConfigError(f"method.cpc.grid: must be >= 2 (a row to predict from and one to predict), "
                              f"got {s.grid}")
        if not 1 <= s.prediction_steps < s.grid:
            raise ConfigError(f"method.cpc.prediction_steps: must be in [1, method.cpc.grid - 1] = [1, {s.grid - 1}] "
                              f"(a row k below must exist), got {s.prediction_steps}")
        super().__init__(cfg)
        self.grid, self.temperature, self.loss_backend = s.grid, s.temperature, cfg.loss.backend
        self.context = ContextNetwork(self.feature_dim, s.context_layers)
        self.predictors = nn.ModuleList(nn.Conv2d(self.feature_dim, self.feature_dim, 1)
                                        for _ in range(s.prediction_steps))

    @classmethod
    def default_views(cls, cfg: Config):
        return [{}]

    @classmethod
    def check_views(cls, views: Sequence) -> None:
        if len(views) != 1:
            raise ConfigError(f"augment.views: method {cls.name} takes exactly 1 view, got {len(views)}")

    def forward(self, views: Views) -> Output:
        z = encode_grid(self.backbone, views[0], self.grid)                   # (N, D, G, G)
        loss, queries, keys, positive = cpc_loss(z, self.context(z), self.predictors, self.temperature,
                                                 backend=self.loss_backend)
        stats = output_std(keys)
        stats["patch_top1"] = top1_accuracy(queries, keys, positive)
        return loss, stats

    def eval_backbone(self) -> nn.Module:
        return PatchGridPooling(self.backbone, self.grid)

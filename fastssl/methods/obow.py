"""OBoW (Gidaris et al. 2021, arXiv 2012.11552): online bag-of-visual-words prediction.

A teacher, the student's EMA (momentum 0.99 -> 1, cosine), turns the whole image into a bag of
visual words per level (the maps after ResNet stages `levels`, by default layer3 and layer4):
1. the squared distance d of every local feature of the map to each of the K words;
2. the soft assignment softmax_k(-inverse_delta * d / mean_min_d), where mean_min_d is an EMA
   (0.99, bias-corrected) of the batch's mean distance of a feature to its nearest word;
3. max-pooling of the assignments over the locations, then L1 normalisation: one distribution
   over the words per image (`soft_bow`).
The student sees other crops (2 of `student_size`, `local_crops` small ones of `local_size`) and
predicts each target from its pooled feature f: logits_k = prediction_scale * w_k . f, where the
unit-norm weight w_k is generated from word k by a small MLP (L2-norm, Linear-BN-ReLU-Linear,
L2-norm), so the head follows the vocabulary as it changes. The loss is the cross-entropy to the
teacher's distribution, averaged over levels and over the crops of one kind, summed over the two
kinds of crop (2 student views, the small crops), as the official code does. Logged per level
besides the bags' perplexities: the student's cross-entropy over all its crops (`ce_<level>`) and
that of the batch's mean bag (`ce_batch_mean_<level>`, `batch_mean_cross_entropy`); the student
predicts something of each image only as far as the first is below the second.

The vocabulary of a level is a FIFO queue of K teacher features: after each step, every image
adds one, picked at random among the teacher's map after a `word_pool_size` local average
pooling. Under torchrun every rank adds the words of the global batch and averages the batch's
mean minimum distance over the ranks, so the vocabularies stay identical.

Details of the official code (github.com/valeoai/obow, obow/builder_obow.py) kept here: the
teacher's maps lose their 1-location border before anything else (the border sees the zero
padding), the EMA of mean_min_d includes the current batch before its assignments are computed,
the student feature f is not normalised (only the weights are), kappa is fixed, the words start
as randn().clamp(min=0). The student's backbone is the one evaluated, as in the paper;
`eval_backbone=teacher` evaluates the teacher instead (the network the official code's online
linear classifier monitors during training), which then also runs its stages past the deepest
level so that all its batch-norm statistics come from its own forward passes.

One difference: the official EMA of mean_min_d starts at 0.5, a value its ~500k steps forget
within a few hundred. A short run would not: in the 186-step demo it held mean_min_d below the
batches' own (~100 at layer2, ~240 at layer3) for the whole run, so the temperature drifted and
the layer3 bags grew from ~11 words an image after the first epoch to ~165 at the end. Here the
EMA is bias-corrected (`ema_rate`): the first batch's value, then the EMA of the batches seen,
the same as the official's once it has forgotten its start.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.config import Config, ConfigError
from fastssl.losses.distributed import rank as process_rank
from fastssl.losses.distributed import world_size
from fastssl.methods.base import (Method, Output, Views, cosine_momentum, ema_update, momentum_teacher,
                                  output_std, split_views)
from fastssl.methods.moco import enqueue, global_keys

STAGES = ("layer1", "layer2", "layer3", "layer4")
# The teacher sees the whole image, only flipped (the official code: resize, centre crop, flip).
TEACHER_VIEW = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                    solarize_p=0.0)
# The official code drops the border of the teacher's maps (7x7 -> 5x5 at 224 px); a smaller map
# would keep too few locations, so it is kept whole below this side.
MIN_SIDE_TO_DROP_BORDER = 5


# --- the teacher's bag of words (the spec; the tests check it by hand) -------------------------------

def word_distances(features: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """(N, L, K) squared Euclidean distances of the N x L local features of `features` (N, C, H, W)
    to the K `words` (K, C), in fp32: |f|^2 + |w|^2 - 2 f.w, clamped at 0."""
    f = features.float().flatten(2).transpose(1, 2)             # (N, L, C)
    w = words.float()
    d = f.pow(2).sum(-1, keepdim=True) + w.pow(2).sum(-1) - 2 * f @ w.t()
    return d.clamp_min(0)


def soft_bow(distances: torch.Tensor, inverse_delta: float, mean_min_distance) -> torch.Tensor:
    """(N, K) bags of words from (N, L, K) squared distances: the soft assignment of each location,
    softmax_k(-inverse_delta * d / mean_min_distance), max-pooled over the L locations and
    L1-normalised (each row a distribution over the words)."""
    codes = F.softmax(-(inverse_delta / mean_min_distance) * distances, dim=-1)
    bow = codes.max(dim=1).values
    return bow / bow.sum(dim=1, keepdim=True)


def perplexity(p: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row of `p` (a distribution): the effective number of words."""
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum(-1))


def batch_mean_cross_entropy(targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of (N, K) target distributions to their own batch mean: the loss of the
    best prediction that ignores the image (it knows only which words are common). A student whose
    cross-entropy is not below it predicts nothing of the image itself."""
    return -(targets * targets.mean(dim=0).clamp_min(1e-12).log()).sum(dim=1).mean()


def ema_rate(momentum: float, updates: int) -> float:
    """The weight of the newest of `updates` values in an EMA whose starting value has no weight
    (Adam's bias correction): (1 - m) / (1 - m^updates), so the first value is taken whole;
    1 / updates at m = 1, the plain mean of the values."""
    return 1.0 / updates if momentum == 1 else (1 - momentum) / (1 - momentum ** updates)


def drop_border(fmap: torch.Tensor) -> torch.Tensor:
    """The map without its outer ring of locations (when it is at least MIN_SIDE_TO_DROP_BORDER wide)."""
    if min(fmap.shape[-2:]) < MIN_SIDE_TO_DROP_BORDER:
        return fmap
    return fmap[:, :, 1:-1, 1:-1]


def sample_words(fmap: torch.Tensor, pool_size: int, generator: torch.Generator) -> torch.Tensor:
    """(N, C): one local feature per image, drawn uniformly from the map after a pool_size x pool_size
    average pooling (stride 1, no padding; the kernel shrinks to a smaller map)."""
    k = min(pool_size, *fmap.shape[-2:])
    pooled = F.avg_pool2d(fmap.float(), kernel_size=k, stride=1).flatten(2)       # (N, C, L')
    n, _, locations = pooled.shape
    index = torch.randint(0, locations, (n,), generator=generator).to(fmap.device)
    return pooled[torch.arange(n, device=fmap.device), :, index]


def stage_maps(backbone: nn.Module, x: torch.Tensor, levels: Sequence[str],
               through: str = "") -> List[torch.Tensor]:
    """The feature maps of a torchvision ResNet after the named stages, in the order of `levels`
    (it runs only as far as the deepest one, or as stage `through` when that is deeper)."""
    deepest = max(STAGES.index(level) for level in levels)
    if through:
        deepest = max(deepest, STAGES.index(through))
    b = backbone
    x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
    maps = {}
    for name in STAGES[:deepest + 1]:
        x = getattr(b, name)(x)
        maps[name] = x
    return [maps[level] for level in levels]


def stage_channels(backbone: nn.Module, name: str) -> int:
    """Channels of a ResNet stage's output: its last batch norm's width."""
    return [m for m in getattr(backbone, name).modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def global_views(student_sizes: Sequence[int]) -> int:
    """How many of the student's views are global: the leading run of views of the first size."""
    return next((i for i, size in enumerate(student_sizes) if size != student_sizes[0]), len(student_sizes))


class Vocabulary(nn.Module):
    """One level's words (a FIFO queue of teacher features), its pointer and mean_min_d."""

    def __init__(self, size: int, channels: int):
        super().__init__()
        self.register_buffer("words", torch.randn(size, channels).clamp(min=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean_min_distance", torch.zeros(()))      # the first batch's value replaces it
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))


def word_generator(channels: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Word (channels) -> unit-norm prediction weight (out_dim): L2-norm, Linear-BN-ReLU-Linear, L2-norm."""
    return nn.Sequential(L2Normalize(), nn.Linear(channels, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim), L2Normalize())


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


class OBoW(Method):
    name = "obow"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        s = cfg.method.obow
        levels = list(s.levels)
        unknown = [level for level in levels if level not in STAGES]
        if not levels or unknown or len(set(levels)) != len(levels):
            raise ConfigError(f"method.obow.levels: expected distinct ResNet stages among {', '.join(STAGES)}, "
                              f"got {levels!r}")
        self.settings, self.levels = s, levels
        self.teacher_backbone = momentum_teacher(self.backbone)
        channels = {level: stage_channels(self.backbone, level) for level in levels}
        self.vocabularies = nn.ModuleDict({level: Vocabulary(s.vocabulary_size, channels[level]) for level in levels})
        self.generators = nn.ModuleDict({level: word_generator(channels[level], s.generator_hidden_dim,
                                                               self.feature_dim) for level in levels})
        self.base_momentum = self.momentum = s.momentum
        self.seed, self.step = cfg.train.seed, 0
        self.pending = None        # {level: (words to enqueue, new mean_min_d)} from the last forward

    @classmethod
    def default_views(cls, cfg: Config) -> List[dict]:
        s = cfg.method.obow
        views = [dict(TEACHER_VIEW),
                 dict(size=s.student_size, crop_scale=s.student_crop_scale, blur_p=0.5, solarize_p=0.0, copies=2)]
        if s.local_crops:       # the official patches are not blurred
            views.append(dict(size=s.local_size, crop_scale=s.local_crop_scale, blur_p=0.0, solarize_p=0.0,
                              copies=s.local_crops))
        return views

    @classmethod
    def check_views(cls, views) -> None:
        if len(views) < 2:
            raise ConfigError(f"augment.views: obow needs the teacher's view, then the student's views, "
                              f"got {len(views)} view(s)")
        student = [v.size for v in views[1:]]
        if len(set(student[global_views(student):])) > 1:
            raise ConfigError(f"augment.views: obow's student views are a run of one size, then small crops of "
                              f"one size; got sizes {student} px after the teacher's view")

    def before_step(self, step: int) -> None:
        self.momentum = cosine_momentum(self.base_momentum, step, self.total_steps)
        self.step = step

    def word_generator_for_step(self) -> torch.Generator:
        """Which location becomes a word: drawn from (train.seed, step, rank), so a resumed run
        draws what the uninterrupted one would have."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.step + (process_rank() << 32) + (7 << 40))

    @torch.no_grad()
    def teacher_targets(self, x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], dict]:
        """The teacher's bags of words of `x` per level, and what after_step applies."""
        # An evaluated teacher runs to its last stage, whose batch-norm statistics would otherwise stay
        # at their initialisation when the deepest level is shallower.
        through = STAGES[-1] if self.settings.eval_backbone == "teacher" else ""
        maps = stage_maps(self.teacher_backbone, x, self.levels, through)
        s, gen = self.settings, self.word_generator_for_step()
        targets, pending = {}, {}
        with torch.autocast(x.device.type, enabled=False):
            for level, fmap in zip(self.levels, maps):
                vocabulary, fmap = self.vocabularies[level], drop_border(fmap.float())
                d = word_distances(fmap, vocabulary.words)
                batch_min = d.min(dim=-1).values.mean()
                if world_size() > 1:        # the mean over the global batch (equal local batches)
                    torch.distributed.all_reduce(batch_min)
                    batch_min /= world_size()
                rate = ema_rate(s.min_distance_momentum, int(vocabulary.batches) + 1)
                mean_min = vocabulary.mean_min_distance + rate * (batch_min - vocabulary.mean_min_distance)
                targets[level] = soft_bow(d, s.inverse_delta, mean_min)
                pending[level] = (global_keys(sample_words(fmap, s.word_pool_size, gen)), mean_min)
        return targets, pending

    def forward(self, views: Views) -> Output:
        student = split_views(views[1:], self.backbone)             # per student view, (N, D)
        n_global = global_views([v.shape[-1] for v in views[1:]])
        targets, self.pending = self.teacher_targets(views[0])
        f = torch.cat(student).float()
        loss, stats = 0.0, {}
        for level in self.levels:
            weights = self.generators[level](self.vocabularies[level].words.clone())         # (K, D), unit rows
            log_p = F.log_softmax(self.settings.prediction_scale * f @ weights.float().t(), dim=1).chunk(len(student))
            t = targets[level]
            ce = [-(t * lp).sum(dim=1).mean() for lp in log_p]
            groups = [ce[:n_global], ce[n_global:]]
            loss = loss + sum(sum(g) / len(g) for g in groups if g) / len(self.levels)
            stats[f"perplexity_{level}"] = perplexity(t).mean().item()                 # words per image
            stats[f"batch_perplexity_{level}"] = perplexity(t.mean(dim=0)).item()      # words in the batch
            stats[f"ce_{level}"] = (sum(ce) / len(ce)).item()
            stats[f"ce_batch_mean_{level}"] = batch_mean_cross_entropy(t).item()
            stats[f"mean_min_distance_{level}"] = self.pending[level][1].item()
        stats.update(output_std(student[0]), momentum=self.momentum)
        return loss, stats

    @torch.no_grad()
    def after_step(self) -> None:
        ema_update(self.teacher_backbone, self.backbone, self.momentum)
        if self.pending is not None:
            for level, (words, mean_min) in self.pending.items():
                vocabulary = self.vocabularies[level]
                enqueue(vocabulary.words, vocabulary.ptr, words)
                vocabulary.mean_min_distance.copy_(mean_min)
                vocabulary.batches += 1
            self.pending = None

    def eval_backbone(self) -> nn.Module:
        """The student (the paper's choice) or, with eval_backbone=teacher, its EMA."""
        return self.teacher_backbone if self.settings.eval_backbone == "teacher" else self.backbone


__all__ = ["OBoW", "batch_mean_cross_entropy", "drop_border", "ema_rate", "perplexity", "sample_words", "soft_bow",
           "stage_maps", "word_distances"]

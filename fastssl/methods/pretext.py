"""Hand-crafted pretext tasks on the method interface.

A pretext task makes its inputs and pseudo-labels from one plainly augmented view (crop and flip,
no colour changes: colour is what some tasks predict), batched on the device, and trains a head
on the backbone's features. The pieces:

- `PretextTask` (an `nn.Module`: the task's head and buffers) says how the loss is computed from
  the backbone and a batch of [0, 1] images, how it is evaluated on held-out images
  (`evaluate` -> summed counts, `report` -> the `pretext <task> val ...` line), and what a batch
  looks like to the model (`show`).
- `PretextMethod` (a `Method`) owns the backbone and one task; `multitask.py` owns several.

Random draws (which permutation, which jitter) come from a generator seeded by (train.seed,
step, rank), so a resumed run draws what the uninterrupted one would have; evaluation draws from
a fixed seed, so every evaluation of a checkpoint sees the same puzzles.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.config import Config, ConfigError
from fastssl.losses.distributed import rank as process_rank
from fastssl.methods.base import Method, Output, Views

# Crop and flip only: colour jitter and grayscale would corrupt the colour targets, blur the
# reconstruction targets.
PLAIN_VIEW = {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
EVAL_SEED = 12345

Row = Tuple[str, torch.Tensor, Optional[List[str]]]   # (title, (K, 3, h, w) images in [0, 1], captions)


class Normalizer(nn.Module):
    """[0, 1] RGB <-> the backbone's input (augment.mean / augment.std), as the views are normalised."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.std + self.mean).clamp(0, 1)


def classifier(in_dim: int, hidden_dim: int, classes: int) -> nn.Sequential:
    """Linear (hidden_dim 0) or Linear-BN-ReLU-Linear over pooled features."""
    if not hidden_dim:
        return nn.Sequential(nn.Linear(in_dim, classes))
    return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, classes))


class DenseHead(nn.Module):
    """A light decoder from the backbone to `out_channels` maps of side `out_size`: the last
    feature map, reduced by a 1x1 conv and upsampled to the early map's side, joined with the
    early map (the stem and first stage: the detail a fine prediction needs, still the backbone's
    own features), a 3x3 conv-BN-ReLU, bilinear upsampling to `out_size` and a last 1x1 conv.
    Light on purpose: the backbone, not the decoder, should learn the features."""

    def __init__(self, feature_dim: int, out_channels: int, width: int = 128):
        super().__init__()
        early_dim = feature_dim // 8          # a ResNet's first stage is 8x narrower than its last
        self.reduce = nn.Sequential(nn.Conv2d(feature_dim, width, 1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(nn.Conv2d(width + early_dim, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, maps: Tuple[torch.Tensor, torch.Tensor], out_size: int) -> torch.Tensor:
        early, last = maps
        x = F.interpolate(self.reduce(last), size=early.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, early], dim=1))
        if x.shape[-1] != out_size:
            x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
        return self.out(x)


def feature_maps(backbone: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(early, last): the feature maps of a torchvision ResNet after its first stage (N, D/8, S/4,
    S/4 with the ImageNet stem) and after its last (N, D, S/32, S/32), before pooling."""
    b = backbone
    early = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
    return early, b.layer4(b.layer3(b.layer2(early)))


class PretextTask(nn.Module):
    """One pretext task: its head, its loss, its held-out metric and its picture."""

    name = ""

    def __init__(self, cfg: Config, feature_dim: int):
        super().__init__()
        self.normalize = Normalizer(cfg.augment.mean, cfg.augment.std)

    def forward(self, backbone: nn.Module, images: torch.Tensor, generator: torch.Generator) -> Output:
        """(loss, stats) from a batch of (N, 3, S, S) images in [0, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, images: torch.Tensor, generator: torch.Generator) -> Dict[str, float]:
        """Sums over a held-out batch (e.g. {'correct', 'count'}) that `report` turns into the line."""
        raise NotImplementedError

    def report(self, sums: Dict[str, float]) -> str:
        """`pretext <task> val <metric>: value (baseline)`."""
        raise NotImplementedError

    @torch.no_grad()
    def show(self, backbone: nn.Module, images: torch.Tensor, generator: torch.Generator) -> List[Row]:
        """Rows of pictures: the batch as the model receives it, with labels or predictions."""
        raise NotImplementedError


class ClassificationTask(PretextTask):
    """A task whose pseudo-label is one of `self.classes` classes (rotation, jigsaw, relative
    position): `classify` gives (logits, labels, the inputs it made); the cross-entropy loss, the
    held-out accuracy and its line against chance follow from it."""

    classes = 0

    def classify(self, backbone: nn.Module, images: torch.Tensor, generator: torch.Generator):
        """(logits (M, classes), labels (M,), the inputs made from `images`, for `show`)."""
        raise NotImplementedError

    def forward(self, backbone: nn.Module, images: torch.Tensor, generator: torch.Generator) -> Output:
        logits, labels, _ = self.classify(backbone, images, generator)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"pretext_acc": (logits.argmax(1) == labels).float().mean().item()}

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, images: torch.Tensor, generator: torch.Generator) -> Dict[str, float]:
        logits, labels, _ = self.classify(backbone, images, generator)
        return {"correct": (logits.argmax(1) == labels).sum().item(), "count": labels.numel()}

    def report(self, sums: Dict[str, float]) -> str:
        accuracy = 100 * sums["correct"] / max(sums["count"], 1)
        return f"pretext {self.name} val accuracy: {accuracy:.1f}% (chance {100 / self.classes:.1f}%)"


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a training step's pretext draws, distinct per rank (each rank's images differ)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + (3 << 40) + process_rank() * (1 << 32))


class PretextMethod(Method):
    """The backbone and its pretext task (`task_class`, set by each task's file; multitask.py has several)."""

    task_class = PretextTask

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.tasks = nn.ModuleDict(self.build_tasks(cfg))
        self.seed, self.step = cfg.train.seed, 0

    def build_tasks(self, cfg: Config) -> Dict[str, PretextTask]:
        return {self.task_class.name: self.task_class(cfg, self.feature_dim)}

    @classmethod
    def default_views(cls, cfg: Config) -> List[dict]:
        return [dict(PLAIN_VIEW)]

    @classmethod
    def check_views(cls, views: Sequence) -> None:
        if len(views) != 1:
            raise ConfigError(f"augment.views: pretext task {cls.name} takes exactly 1 view, got {len(views)}")

    def before_step(self, step: int) -> None:
        self.step = step

    def images(self, views: Views) -> torch.Tensor:
        """The view back in [0, 1] RGB (each task builds its own inputs from it)."""
        return next(iter(self.tasks.values())).normalize.inverse(views[0])

    def forward(self, views: Views) -> Output:
        (task,) = self.tasks.values()
        return task(self.backbone, self.images(views), step_generator(self.seed, self.step))

    def pretext_tasks(self) -> List[Tuple[PretextTask, nn.Module]]:
        return [(task, self.backbone) for task in self.tasks.values()]

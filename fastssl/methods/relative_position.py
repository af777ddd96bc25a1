"""Context prediction (Doersch, Gupta, Efros 2015, arXiv 1505.05192): given the centre patch of a
3x3 grid and one of its 8 neighbours, predict where the neighbour lies.

The patches are separated by a gap and jittered inside their cells (no edge continuation or
alignment shortcut), and chromatic aberration, which lets a network tell a patch's position in
the lens from its colour fringes, is removed by projecting out the green-magenta axis (or by
dropping two colour channels). One backbone encodes both patches; the concatenated pair goes to
an 8-way classifier.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F

from fastssl.config import Config
from fastssl.methods.base import Output
from fastssl.methods.jigsaw import grid_geometry, resized
from fastssl.methods.pretext import PretextMethod, PretextTask, Row, accuracy_line, classifier
from fastssl.pretext.patches import NEIGHBOURS, patch_pairs, sample_patch_pairs


class RelativePositionTask(PretextTask):
    name = "relative_position"

    def __init__(self, cfg: Config, feature_dim: int):
        super().__init__(cfg, feature_dim)
        self.settings = s = cfg.method.relative_position
        self.head = classifier(2 * feature_dim, s.hidden_dim, len(NEIGHBOURS))

    def pairs(self, images: torch.Tensor, generator: torch.Generator):
        """(centre patches, neighbour patches, labels) from [0, 1] images."""
        s = self.settings
        x = resized(images, s.input_size)
        gap, jitter = grid_geometry(x.shape[-1], s.gap, s.jitter)
        params = sample_patch_pairs(x.shape[0], jitter, generator, chroma=s.chroma)
        centre, neighbour = patch_pairs(x, params, gap=gap, jitter=jitter, chroma=s.chroma)
        return centre, neighbour, params["labels"].to(x.device)

    def logits(self, backbone, centre: torch.Tensor, neighbour: torch.Tensor) -> torch.Tensor:
        f_centre, f_neighbour = backbone(self.normalize(torch.cat([centre, neighbour]))).chunk(2)
        return self.head(torch.cat([f_centre, f_neighbour], dim=1))

    def forward(self, backbone, images: torch.Tensor, generator: torch.Generator) -> Output:
        centre, neighbour, labels = self.pairs(images, generator)
        logits = self.logits(backbone, centre, neighbour)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"pretext_acc": (logits.argmax(1) == labels).float().mean().item()}

    @torch.no_grad()
    def evaluate(self, backbone, images: torch.Tensor, generator: torch.Generator) -> Dict[str, float]:
        centre, neighbour, labels = self.pairs(images, generator)
        pred = self.logits(backbone, centre, neighbour).argmax(1)
        return {"correct": (pred == labels).sum().item(), "count": labels.numel()}

    def report(self, sums: Dict[str, float]) -> str:
        return accuracy_line(self.name, sums["correct"], sums["count"], 1 / len(NEIGHBOURS))

    @torch.no_grad()
    def show(self, backbone, images: torch.Tensor, generator: torch.Generator) -> List[Row]:
        centre, neighbour, labels = self.pairs(images, generator)
        pred = self.logits(backbone, centre, neighbour).argmax(1)
        # clamp: the dropped colour channels hold noise around the kept one
        return [("centre patches", centre.clamp(0, 1), None),
                ("neighbours: row,col in the 3x3 grid (p: predicted)", neighbour.clamp(0, 1),
                 ["{},{} p:{},{}".format(*NEIGHBOURS[int(y)], *NEIGHBOURS[int(p)]) for y, p in zip(labels, pred)])]


class RelativePosition(PretextMethod):
    name = "relative_position"
    task_class = RelativePositionTask

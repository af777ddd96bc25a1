"""Context prediction (Doersch, Gupta, Efros 2015, arXiv 1505.05192): given the centre patch of a
3x3 grid and one of its 8 neighbours, predict where the neighbour lies.

The patches are separated by a gap and jittered inside their cells (no edge continuation or
alignment shortcut), and chromatic aberration, which lets a network tell a patch's position in
the lens from its colour fringes, is removed by projecting out the green-magenta axis (or by
dropping two colour channels). One backbone encodes both patches; the concatenated pair goes to
an 8-way classifier.
"""
from typing import List

import torch

from fastssl.config import Config
from fastssl.methods.jigsaw import grid_geometry, resized
from fastssl.methods.pretext import ClassificationTask, PretextMethod, Row, classifier
from fastssl.pretext.patches import NEIGHBOURS, patch_pairs, sample_patch_pairs


class RelativePositionTask(ClassificationTask):
    name = "relative_position"
    classes = len(NEIGHBOURS)

    def __init__(self, cfg: Config, feature_dim: int):
        super().__init__(cfg, feature_dim)
        self.settings = s = cfg.method.relative_position
        self.head = classifier(2 * feature_dim, s.hidden_dim, self.classes)

    def pairs(self, images: torch.Tensor, generator: torch.Generator):
        """(centre patches, neighbour patches, labels) from [0, 1] images."""
        s = self.settings
        x = resized(images, s.input_size)
        gap, jitter = grid_geometry(x.shape[-1], s.gap, s.jitter)
        params = sample_patch_pairs(x.shape[0], jitter, generator, chroma=s.chroma)
        centre, neighbour = patch_pairs(x, params, gap=gap, jitter=jitter, chroma=s.chroma)
        return centre, neighbour, params["labels"].to(x.device)

    def classify(self, backbone, images: torch.Tensor, generator: torch.Generator):
        centre, neighbour, labels = self.pairs(images, generator)
        f_centre, f_neighbour = backbone(self.normalize(torch.cat([centre, neighbour]))).chunk(2)
        return self.head(torch.cat([f_centre, f_neighbour], dim=1)), labels, (centre, neighbour)

    @torch.no_grad()
    def show(self, backbone, images: torch.Tensor, generator: torch.Generator) -> List[Row]:
        logits, labels, (centre, neighbour) = self.classify(backbone, images, generator)
        pred = logits.argmax(1)
        # clamp: the dropped colour channels hold noise around the kept one
        return [("centre patches", centre.clamp(0, 1), None),
                ("neighbours: row,col in the 3x3 grid (p: predicted)", neighbour.clamp(0, 1),
                 ["{},{} p:{},{}".format(*NEIGHBOURS[int(y)], *NEIGHBOURS[int(p)]) for y, p in zip(labels, pred)])]


class RelativePosition(PretextMethod):
    name = "relative_position"
    task_class = RelativePositionTask

"""RotNet (Gidaris, Singh, Komodakis 2018, arXiv 1803.07728): predict which of 0/90/180/270
degrees an image was rotated by. All four rotations of every image are in the same batch (their
paper's best setting), and a classifier on the pooled features predicts the rotation."""
from typing import List

import torch

from fastssl.config import Config
from fastssl.methods.pretext import ClassificationTask, PretextMethod, Row, classifier
from fastssl.pretext.patches import rotate_batch


class RotationTask(ClassificationTask):
    name = "rotation"
    classes = 4

    def __init__(self, cfg: Config, feature_dim: int):
        super().__init__(cfg, feature_dim)
        self.head = classifier(feature_dim, cfg.method.rotation.hidden_dim, self.classes)

    def classify(self, backbone, images: torch.Tensor, generator: torch.Generator):
        rotated, labels = rotate_batch(images)                         # (4N, 3, S, S), (4N,)
        return self.head(backbone(self.normalize(rotated))), labels, rotated

    @torch.no_grad()
    def show(self, backbone, images: torch.Tensor, generator: torch.Generator) -> List[Row]:
        logits, _, rotated = self.classify(backbone, images, generator)
        n, pred = images.shape[0], logits.argmax(1)
        return [(f"rotated by {90 * k} degrees (label {k})", rotated[k * n:(k + 1) * n],
                 [f"pred {90 * int(p)}" for p in pred[k * n:(k + 1) * n]]) for k in range(4)]


class Rotation(PretextMethod):
    name = "rotation"
    task_class = RotationTask

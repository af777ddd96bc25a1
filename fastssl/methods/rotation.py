"""RotNet (Gidaris, Singh, Komodakis 2018, arXiv 1803.07728): predict which of 0/90/180/270
degrees an image was rotated by. All four rotations of every image are in the same batch (their
paper's best setting), and a classifier on the pooled features predicts the rotation."""
from typing import Dict, List

import torch
import torch.nn.functional as F

from fastssl.config import Config
from fastssl.methods.base import Output
from fastssl.methods.pretext import PretextMethod, PretextTask, Row, accuracy_line, classifier
from fastssl.pretext.patches import rotate_batch


class RotationTask(PretextTask):
    name = "rotation"

    def __init__(self, cfg: Config, feature_dim: int):
        super().__init__(cfg, feature_dim)
        self.head = classifier(feature_dim, cfg.method.rotation.hidden_dim, 4)

    def logits(self, backbone, images: torch.Tensor):
        rotated, labels = rotate_batch(images)                         # (4N, 3, S, S), (4N,)
        return self.head(backbone(self.normalize(rotated))), labels, rotated

    def forward(self, backbone, images: torch.Tensor, generator: torch.Generator) -> Output:
        logits, labels, _ = self.logits(backbone, images)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"pretext_acc": (logits.argmax(1) == labels).float().mean().item()}

    @torch.no_grad()
    def evaluate(self, backbone, images: torch.Tensor, generator: torch.Generator) -> Dict[str, float]:
        logits, labels, _ = self.logits(backbone, images)
        return {"correct": (logits.argmax(1) == labels).sum().item(), "count": labels.numel()}

    def report(self, sums: Dict[str, float]) -> str:
        return accuracy_line(self.name, sums["correct"], sums["count"], 1 / 4)

    @torch.no_grad()
    def show(self, backbone, images: torch.Tensor, generator: torch.Generator) -> List[Row]:
        logits, labels, rotated = self.logits(backbone, images)
        n, pred = images.shape[0], logits.argmax(1)
        return [(f"rotated by {90 * k} degrees (label {k})", rotated[k * n:(k + 1) * n],
                 [f"pred {90 * int(p)}" for p in pred[k * n:(k + 1) * n]]) for k in range(4)]


class Rotation(PretextMethod):
    name = "rotation"
    task_class = RotationTask

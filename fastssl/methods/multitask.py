"""Several pretext tasks on one backbone (after Doersch & Zisserman 2017, "Multi-task
Self-Supervised Visual Learning", arXiv 1708.07860): one head per task, each task reading its own
`method.<task>` section, the losses weighted by `method.multitask.weights`.

`mode=sum` runs every task on every batch and sums the weighted losses; `mode=alternate` runs one
task per step, in turn (cheaper per step; the other heads get a zero gradient, so every
parameter takes part in every backward, as DDP requires). Split-brain cannot share a backbone
(it has two) and is refused.
"""
from typing import Dict

from fastssl.config import Config, ConfigError
from fastssl.methods.base import Output, Views
from fastssl.methods.colorization import ColorizationTask
from fastssl.methods.inpainting import InpaintingTask
from fastssl.methods.jigsaw import JigsawTask
from fastssl.methods.pretext import PretextMethod, PretextTask, step_generator
from fastssl.methods.relative_position import RelativePositionTask
from fastssl.methods.rotation import RotationTask
from fastssl.methods.super_resolution import SuperResolutionTask

SHARED_BACKBONE_TASKS = {cls.name: cls for cls in (RotationTask, JigsawTask, RelativePositionTask, ColorizationTask,
                                                   InpaintingTask, SuperResolutionTask)}


class MultiTask(PretextMethod):
    name = "multitask"

    def build_tasks(self, cfg: Config) -> Dict[str, PretextTask]:
        s = cfg.method.multitask
        if not s.tasks:
            raise ConfigError("method.multitask.tasks: name at least one task")
        for name in s.tasks:
            if name not in SHARED_BACKBONE_TASKS:
                raise ConfigError(f"method.multitask.tasks: {name!r} cannot share the backbone; choose from "
                                  f"{', '.join(SHARED_BACKBONE_TASKS)}")
        if len(set(s.tasks)) != len(s.tasks):
            raise ConfigError(f"method.multitask.tasks: a task is listed twice in {s.tasks}")
        if s.weights and (len(s.weights) != len(s.tasks) or min(s.weights) < 0):
            raise ConfigError(f"method.multitask.weights: one weight >= 0 per task ({len(s.tasks)}), got {s.weights}")
        self.weights = list(s.weights) or [1.0] * len(s.tasks)
        self.mode = s.mode
        return {name: SHARED_BACKBONE_TASKS[name](cfg, self.feature_dim) for name in s.tasks}

    def forward(self, views: Views) -> Output:
        images, generator = self.images(views), step_generator(self.seed, self.step)
        tasks = list(self.tasks.items())
        active = range(len(tasks)) if self.mode == "sum" else [self.step % len(tasks)]
        loss, stats = 0.0, {}
        for i in active:
            name, task = tasks[i]
            task_loss, task_stats = task(self.backbone, images, generator)
            loss = loss + self.weights[i] * task_loss
            stats.update({f"{name}_loss": task_loss.item(), **{f"{name}_{k}": v for k, v in task_stats.items()}})
        if self.mode == "alternate":
            idle = [p for i, (_, task) in enumerate(tasks) if i not in active for p in task.parameters()]
            loss = loss + 0.0 * sum(p.sum() for p in idle)
        return loss, stats

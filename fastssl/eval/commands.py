"""`fastssl eval knn|linear|pretext` and `fastssl export`: evaluate or export a pre-training checkpoint.

The model is rebuilt from the config saved in the checkpoint (or from `--config`), with
`key=value` overrides on top (e.g. `data.val=...`, `eval.linear_epochs=...`).
"""
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from fastssl.augment import normalize
from fastssl.config import Config, flatten, load_config
from fastssl.data import build_loader, resolve_paths
from fastssl.eval.knn import extract_features, knn_accuracy
from fastssl.eval.linear import linear_probe
from fastssl.methods import build_method
from fastssl.methods.pretext import EVAL_SEED


def load_for_eval(checkpoint, config: Optional[str] = None, overrides: Optional[List[str]] = None):
    """(cfg, state): the checkpoint's saved config (or `config`), then `overrides`."""
    from fastssl.config import parse_overrides
    from fastssl.train.checkpoint import load_checkpoint
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no file at {path}")
    state = load_checkpoint(path)
    extra = parse_overrides(overrides or [])
    if config is None:
        if "config" not in state:
            raise FileNotFoundError(f"{path} holds no config; pass --config")
        cfg = load_config(None, {**flatten(state["config"]), **extra})
    else:
        cfg = load_config(config, extra)
    return cfg, state


def trained_backbone(cfg: Config, state) -> torch.nn.Module:
    """The backbone the method evaluates (DINO: the teacher's), with the checkpoint's weights."""
    model = build_method(cfg)
    model.load_state_dict(state["model"])
    return model.eval_backbone()


def on_device(backbone: torch.nn.Module, device) -> torch.nn.Module:
    """A backbone ready for feature extraction: on `device`, channels_last, in eval mode."""
    return backbone.to(device).to(memory_format=torch.channels_last).eval()


def eval_loaders(cfg: Config, device, skipped=None):
    """Centre-view loaders over the train and val data (the embedded dataset when unset);
    unreadable images skipped under data.on_bad_image=skip are recorded in `skipped`."""
    train_dir, val_dir = resolve_paths(cfg.data, log=lambda *_: None)
    return tuple(build_loader(cfg.data, root, size=cfg.augment.size, batch_size=cfg.eval.batch_size,
                              device=device, train=False, skipped=skipped) for root in (train_dir, val_dir))


def eval_preprocess(cfg: Config):
    """Centre views (uint8) -> the backbone's input: normalised as the training views are, channels_last."""
    def preprocess(images):
        return normalize(images, cfg.augment.mean, cfg.augment.std).contiguous(memory_format=torch.channels_last)
    return preprocess


def features(cfg: Config, backbone, loaders, l2_normalize: bool) -> Tuple[torch.Tensor, ...]:
    """(train features, train labels, val features, val labels) of one centre view per image."""
    train_f, train_y = extract_features(backbone, loaders[0], eval_preprocess(cfg), normalize=l2_normalize)
    val_f, val_y = extract_features(backbone, loaders[1], eval_preprocess(cfg), normalize=l2_normalize)
    return train_f, train_y, val_f, val_y


def knn_top1(cfg: Config, backbone, loaders) -> float:
    """Weighted kNN top-1 (eval.knn_k, eval.knn_temperature) of a backbone's features."""
    train_f, train_y, val_f, val_y = features(cfg, backbone, loaders, True)
    return knn_accuracy(train_f, train_y, val_f, val_y, cfg.eval.knn_k, cfg.eval.knn_temperature)


def eval_knn(cfg: Config, state, device) -> Dict[str, float]:
    return {"knn_top1": knn_top1(cfg, on_device(trained_backbone(cfg, state), device), eval_loaders(cfg, device))}


def eval_linear(cfg: Config, state, device) -> Dict[str, float]:
    backbone = on_device(trained_backbone(cfg, state), device)
    train_f, train_y, val_f, val_y = features(cfg, backbone, eval_loaders(cfg, device), False)
    e = cfg.eval
    return linear_probe(train_f, train_y, val_f, val_y, epochs=e.linear_epochs, lr=e.linear_lr,
                        batch_size=e.linear_batch_size, weight_decay=e.linear_weight_decay, seed=cfg.train.seed)


def pretext_lines(method, loader) -> List[str]:
    """Each pretext task's held-out line (`pretext <task> val ...`) over `loader`'s centre views;
    the tasks' random draws come from a fixed seed, so every evaluation poses the same puzzles.
    Empty for methods without a pretext task."""
    pairs = method.pretext_tasks()
    if not pairs:
        return []
    was_training = method.training
    method.eval()
    generator = torch.Generator().manual_seed(EVAL_SEED)
    totals = [{} for _ in pairs]
    with torch.no_grad():
        for views, _, _ in loader:
            images = views[0].float() / 255.0
            for (task, backbone), total in zip(pairs, totals):
                for key, value in task.evaluate(backbone, images, generator).items():
                    total[key] = total.get(key, 0) + value
    method.train(was_training)
    return [task.report(total) for (task, _), total in zip(pairs, totals)]


def eval_pretext(cfg: Config, state, device) -> List[str]:
    method = build_method(cfg)
    method.load_state_dict(state["model"])
    return pretext_lines(method.to(device), eval_loaders(cfg, device)[1])


def export_backbone(cfg: Config, state, out) -> Tuple[Path, Optional[str]]:
    """(path, input note): the backbone's state dict (no `fc`): it loads with strict=True into
    torchvision's ResNet of the same name once its `fc` is `torch.nn.Identity()` (and, for
    `model.stem=small`, its conv1 is a 3x3 stride-1 conv without bias and its maxpool an
    Identity). The backbone is the one the method evaluates (DINO: the teacher's). Where the
    evaluated network converts its input first (colourisation: RGB -> L; split-brain: two
    ResNets on L and ab), the note says what the exported weights expect."""
    evaluated = trained_backbone(cfg, state)
    note = getattr(evaluated, "input_note", None)
    network = getattr(evaluated, "net", evaluated)      # LightnessInput wraps a plain ResNet
    backbone = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone, out)
    return out, note

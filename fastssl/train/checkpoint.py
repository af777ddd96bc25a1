"""Checkpoints written atomically: a crash mid-write leaves the previous checkpoint intact.

Layout in the run directory: checkpoints/last.pt (always the newest) and
checkpoints/epoch_NNNN.pt (the newest `keep` of them).
"""
import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch


def save_atomic(state: Dict[str, Any], path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(state: Dict[str, Any], run_dir, epoch: int, keep: int = 2) -> Path:
    """Write last.pt and epoch_NNNN.pt; delete epoch files beyond the newest `keep`."""
    folder = Path(run_dir) / "checkpoints"
    numbered = folder / f"epoch_{epoch:04d}.pt"
    save_atomic(state, numbered)
    save_atomic(state, folder / "last.pt")
    for old in sorted(folder.glob("epoch_*.pt"))[:-keep] if keep > 0 else sorted(folder.glob("epoch_*.pt")):
        old.unlink()
    return numbered


def resolve_resume(resume, run_dir) -> Path:
    """`true` -> run_dir/checkpoints/last.pt; a string -> that path. Clear error when missing."""
    path = Path(run_dir) / "checkpoints" / "last.pt" if resume is True else Path(str(resume))
    if not path.is_file():
        raise FileNotFoundError(f"train.resume: no checkpoint at {path}")
    return path


def load_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, ...: all mean "unreadable"
        raise RuntimeError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    missing = {"model", "optimizer", "epoch", "step"} - set(state)
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {', '.join(sorted(missing))}: not a fastssl checkpoint")
    return state

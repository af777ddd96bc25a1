"""Checkpoints written atomically: a crash mid-write leaves the previous checkpoint intact.

Layout in the run directory: checkpoints/last.pt (always the newest: the end of an epoch, or a
position within one) and checkpoints/epoch_NNNN.pt (the newest `keep` of them).

A checkpoint holds the model, the optimiser, the gradient scaler, the schedule position (`step`,
`epoch` = epochs completed, `batch` = batches of epoch `epoch` already done), the RNG states
(torch CPU, CUDA when present, python `random`, numpy) and the resolved config.
"""
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

log = logging.getLogger("fastssl")


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
    """Write epoch_NNNN.pt, point last.pt at it, and delete epoch files beyond the newest `keep`."""
    folder = Path(run_dir) / "checkpoints"
    numbered = folder / f"epoch_{epoch:04d}.pt"
    save_atomic(state, numbered)
    # last.pt is the same bytes: a hard link renamed into place (atomic, no second write of a
    # checkpoint that can be hundreds of MB); filesystems without hard links get a second copy.
    link = folder / f".last.pt.{os.getpid()}.link"
    try:
        os.link(numbered, link)
        os.replace(link, folder / "last.pt")
    except OSError:
        save_atomic(state, folder / "last.pt")
    epochs = sorted(folder.glob("epoch_*.pt"))
    for old in epochs[:max(0, len(epochs) - keep)]:
        old.unlink()
    return numbered


def save_last(state: Dict[str, Any], run_dir) -> Path:
    """Write last.pt only (a position within an epoch)."""
    path = Path(run_dir) / "checkpoints" / "last.pt"
    save_atomic(state, path)
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


def find_and_load(resume, run_dir, map_location="cpu"):
    """(path, state) to resume from, or (None, None) to start afresh.

    `false`: start afresh. A path: that file, strictly. `true`: run_dir/checkpoints/last.pt, an
    error when the folder holds no checkpoint. `auto`: the same, but no checkpoint means starting
    afresh. For `true` and `auto`, an unreadable last.pt is reported (naming it) and the newest
    readable epoch_NNNN.pt is used instead, with a warning.
    """
    if resume is False or resume is None or resume == "":
        return None, None
    if resume is not True and str(resume) != "auto":
        path = Path(str(resume))
        if not path.is_file():
            raise FileNotFoundError(f"train.resume: no checkpoint at {path}")
        return path, load_checkpoint(path, map_location)
    folder = Path(run_dir) / "checkpoints"
    last = folder / "last.pt"
    candidates = ([last] if last.is_file() else []) + sorted(folder.glob("epoch_*.pt"), reverse=True)
    if not candidates:
        if resume is True:
            raise FileNotFoundError(f"train.resume: no checkpoint at {last}")
        log.info("train.resume=auto: no checkpoint in %s yet; starting afresh", folder)
        return None, None
    if candidates[0] != last:
        log.warning("train.resume: %s is missing; using %s", last, candidates[0])
    errors = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location)
        except RuntimeError as exc:
            errors.append(str(exc))
            log.error("%s", exc)
            continue
        if errors:
            log.warning("train.resume: falling back to %s (epoch %d, step %d), the newest readable checkpoint",
                        path, state["epoch"], state["step"])
        return path, state
    raise RuntimeError("train.resume: no readable checkpoint in " + str(folder) + ": " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------
# RNG states, in a form torch.load(weights_only=True) accepts (tensors, ints, floats, strings).

def rng_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))

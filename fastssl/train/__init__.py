"""Training: the trainer loop, checkpoints, progress."""
from fastssl.train.trainer import NonFiniteLossError, build_model, train

__all__ = ["NonFiniteLossError", "build_model", "train"]

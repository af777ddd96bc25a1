"""Training: the trainer loop, checkpoints, progress."""
from fastssl.train.trainer import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "train"]

"""Self-supervised methods: each is a module whose forward maps a list of views to (loss, stats)."""
from fastssl.methods.simclr import SimCLR

METHODS = {"simclr": SimCLR}

__all__ = ["METHODS", "SimCLR"]

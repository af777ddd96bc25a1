"""Batched augmentation on the device: recipes draw parameters, backends apply them."""
from fastssl.augment.simclr import AugmentConfigError, SimCLRAugment, color_jitter, grayscale, normalize

__all__ = ["AugmentConfigError", "SimCLRAugment", "color_jitter", "grayscale", "normalize"]

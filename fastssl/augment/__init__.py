"""Batched augmentation on the device: recipes draw parameters, backends apply them."""
from fastssl.augment.multiview import RECIPES, MultiViewAugment
from fastssl.augment.simclr import BACKENDS, AugmentConfigError, SimCLRAugment, color_jitter, grayscale, normalize

__all__ = ["AugmentConfigError", "BACKENDS", "MultiViewAugment", "RECIPES", "SimCLRAugment", "color_jitter",
           "grayscale", "normalize"]

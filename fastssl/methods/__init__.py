"""Self-supervised methods behind one interface (base.Method); `method.name` picks one.

`build_method(cfg)` builds the selected method, initialised from `train.seed`; `build_augment(cfg)`
builds its views: `augment.views` when set, else the method's `default_views`, each merged over
the `augment` section and checked by the method.
"""
import torch

from fastssl.augment import AugmentConfigError, MultiViewAugment
from fastssl.config import Config, ConfigError, to_dict
from fastssl.data import ViewCrop
from fastssl.losses import BACKENDS
from fastssl.methods.base import Method
from fastssl.methods.byol import BYOL
from fastssl.methods.colorization import Colorization
from fastssl.methods.cpc import CPC
from fastssl.methods.deepcluster import DeepCluster
from fastssl.methods.dino import DINO
from fastssl.methods.inpainting import Inpainting
from fastssl.methods.jigsaw import Jigsaw
from fastssl.methods.moco import MoCoV2, MoCoV3
from fastssl.methods.multitask import MultiTask
from fastssl.methods.obow import OBoW
from fastssl.methods.pretext import PretextMethod
from fastssl.methods.relative_position import RelativePosition
from fastssl.methods.rotation import Rotation
from fastssl.methods.simclr import SimCLR
from fastssl.methods.simsiam import SimSiam
from fastssl.methods.split_brain import SplitBrain
from fastssl.methods.super_resolution import SuperResolution

EMBEDDING_METHODS = (SimCLR, MoCoV2, MoCoV3, BYOL, SimSiam, DINO)
CLUSTERING_AND_PREDICTIVE_METHODS = (DeepCluster, OBoW, CPC)
PRETEXT_METHODS = (Rotation, Jigsaw, RelativePosition, Colorization, Inpainting, SplitBrain, SuperResolution, MultiTask)
METHODS = {cls.name: cls for cls in EMBEDDING_METHODS + CLUSTERING_AND_PREDICTIVE_METHODS + PRETEXT_METHODS}


def method_class(cfg: Config):
    if cfg.method.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {cfg.method.name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method.name]


def build_method(cfg: Config) -> Method:
    """The method named by `method.name`, initialised from `train.seed` (so the random-init
    baseline is reproducible)."""
    cls = method_class(cfg)
    if cfg.loss.backend not in BACKENDS:
        raise ConfigError(f"loss.backend: unknown backend {cfg.loss.backend!r}; choose one of {', '.join(BACKENDS)}")
    torch.manual_seed(cfg.train.seed)
    return cls(cfg)


def build_augment(cfg: Config) -> MultiViewAugment:
    """One augmentation per view: `augment.views` (or the method's default views), each a mapping
    of overrides of the `augment` section, `copies: k` for k alike views.

    The loader cuts the random crops (see `view_crops`), so the augmentations only resize
    (crop=False); a view's size and crop ranges are the loader's.
    """
    cls = method_class(cfg)
    settings = to_dict(cfg)["augment"]
    settings.pop("backend")
    views = settings.pop("views") or cls.default_views(cfg)
    for i, view in enumerate(views):
        if isinstance(view, dict) and "crop" in view:
            raise ConfigError(f"augment.views[{i}].crop: the loader cuts every view's random crop; "
                              "set size, crop_scale and crop_ratio instead")
    try:
        augment = MultiViewAugment([{**settings, **view, "crop": False} if isinstance(view, dict) else view
                                    for view in views])
    except AugmentConfigError as exc:
        raise ConfigError(f"augment.{exc}") from None
    cls.check_views(augment.views)
    return augment


def view_crops(augment: MultiViewAugment):
    """The loader's crop per view (size, area and aspect ranges) from the augmentation's views."""
    return [ViewCrop(v.size, tuple(v.crop_scale), tuple(v.crop_ratio)) for v in augment.views]


__all__ = ["BYOL", "CLUSTERING_AND_PREDICTIVE_METHODS", "CPC", "DINO", "DeepCluster", "EMBEDDING_METHODS", "METHODS", "PRETEXT_METHODS", "Method", "MoCoV2", "MoCoV3", "OBoW",
           "PretextMethod", "SimCLR", "SimSiam", "build_augment", "build_method", "method_class", "view_crops"]

"""Several views per image, each with its own SimCLRAugment settings, from plain dicts.

`MultiViewAugment(views=[{...}, {...}])` takes one mapping of SimCLRAugment keyword arguments
per view, so a YAML list can be passed straight in. A mapping may add `copies: k` for k views
with the same settings (the local crops of multi-crop). Views are independent: each draws its
own parameters (`sample` returns one dict per view) and may have its own output size.

RECIPES holds the asymmetric and multi-crop settings of the papers, in the same form:
- "byol" (Grill et al. 2020, Table 6): view 1 always blurred and never solarised, view 2 blurred
  with p=0.1 and solarised with p=0.2. BYOL's jitter (0.4, 0.4, 0.2, 0.1) is approximated by
  jitter_strength=0.5 (0.4, 0.4, 0.4, 0.1): the recipe scales all four factors together.
- "multi_crop" (SwAV, Caron et al. 2020): 2 global 224-px views with crop scale (0.14, 1) and
  6 local 96-px views with crop scale (0.05, 0.14).
"""
from dataclasses import fields
from typing import Dict, List, Mapping, Sequence

import torch

from fastssl.augment.simclr import AugmentConfigError, SimCLRAugment

SETTINGS = tuple(f.name for f in fields(SimCLRAugment))

RECIPES = {
    "simclr": [{}, {}],
    "byol": [dict(jitter_strength=0.5, blur_p=1.0, solarize_p=0.0),
             dict(jitter_strength=0.5, blur_p=0.1, solarize_p=0.2)],
    "multi_crop": [dict(size=224, crop_scale=(0.14, 1.0), copies=2),
                   dict(size=96, crop_scale=(0.05, 0.14), copies=6)],
}


class MultiViewAugment:
    def __init__(self, views: Sequence[Mapping]):
        if isinstance(views, (str, bytes, Mapping)) or not isinstance(views, Sequence) or not views:
            raise AugmentConfigError(f"views: expected a non-empty list of view settings, got {views!r}")
        self.views: List[SimCLRAugment] = []
        for i, spec in enumerate(views):
            if not isinstance(spec, Mapping):
                raise AugmentConfigError(f"views[{i}]: expected a mapping of SimCLRAugment settings, got {spec!r}")
            spec = dict(spec)
            copies = spec.pop("copies", 1)
            if not (isinstance(copies, int) and not isinstance(copies, bool) and copies >= 1):
                raise AugmentConfigError(f"views[{i}].copies: must be a positive integer, got {copies!r}")
            unknown = sorted(set(spec) - set(SETTINGS))
            if unknown:
                raise AugmentConfigError(f"views[{i}].{unknown[0]}: unknown setting; known: copies, {', '.join(SETTINGS)}")
            try:
                aug = SimCLRAugment(**spec)
            except AugmentConfigError as e:
                raise AugmentConfigError(f"views[{i}].{e}") from None
            self.views += [aug] * copies

    @classmethod
    def recipe(cls, name: str) -> "MultiViewAugment":
        if name not in RECIPES:
            raise AugmentConfigError(f"recipe: unknown {name!r}; choose one of: {', '.join(RECIPES)}")
        return cls(RECIPES[name])

    def __len__(self) -> int:
        return len(self.views)

    def sample(self, batch_size: int, generator: torch.Generator = None) -> List[Dict[str, torch.Tensor]]:
        """One parameter dict per view (CPU tensors); views draw one after the other from `generator`."""
        return [view.sample(batch_size, generator) for view in self.views]

    def apply(self, images: torch.Tensor, params: Sequence[Dict[str, torch.Tensor]], backend: str = "kornia",
              out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> List[torch.Tensor]:
        """Each view's params applied to the same images: a list of (N, 3, size_v, size_v) tensors."""
        if len(params) != len(self.views):
            raise ValueError(f"{len(self.views)} views but {len(params)} parameter dicts")
        return [view.apply(images, p, backend=backend, out_dtype=out_dtype, channels_last=channels_last)
                for view, p in zip(self.views, params)]

    def __call__(self, images: torch.Tensor, generator: torch.Generator = None, backend: str = "kornia",
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> List[torch.Tensor]:
        return self.apply(images, self.sample(images.shape[0], generator), backend, out_dtype, channels_last)

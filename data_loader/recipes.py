"""The paper's augmentation recipes (`docs/reference.md §5`) as tables, one `ViewSpec` per view:
the PIL pipeline (`data_loader.transforms`) and the batched one (`data_loader.gpu_augment`) both
build their views from them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Union

from utils.config import ConfigError

TransformType = Literal["val", "val_bicubic_inter", "linear_prob", "simclr", "dino", "dino_multicrop"]

MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation, the last step of every view
STD = (0.229, 0.224, 0.225)
GLOBAL_SIZE, LOCAL_SIZE = 224, 96
N_LOCAL_VIEWS = 6
RATIO = (3 / 4, 4 / 3)  # the aspect ratios of the random crops (torchvision's RandomResizedCrop default)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """One random view: a crop of `scale` of the image's area and an aspect ratio in `ratio`,
    resized to `size` (bicubic or bilinear), then each step with its probability (0 leaves it out).
    `jitter` is ColorJitter's (brightness, contrast, saturation, hue); the blur's standard deviation
    is uniform in `blur_sigma`. `flip_last`: the PIL recipe flips last (SimCLR's order), which
    changes only the order of its random draws."""

    size: int
    scale: tuple[float, float]
    bicubic: bool
    ratio: tuple[float, float] = RATIO
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    flip_last: bool = False


@dataclasses.dataclass(frozen=True)
class CentreCropSpec:
    """The evaluation view: the shorter side resized to `resize` (bicubic or bilinear), the centre
    `size` x `size` cropped; no randomness."""

    bicubic: bool
    resize: int = 256
    size: int = GLOBAL_SIZE


View = Union[ViewSpec, CentreCropSpec]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recipe's views, cycled for as many as asked (`[1, 2]` makes 3 views as `[1, 2, 1]`), and the
    view counts it makes (None: any from 1)."""

    views: tuple[View, ...]
    n_augs: tuple[int, ...] | None


DINO_COLOUR = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2)
DINO_GLOBAL_1 = ViewSpec(GLOBAL_SIZE, (0.14, 1.0), True, blur_p=1.0, **DINO_COLOUR)
DINO_GLOBAL_2 = ViewSpec(GLOBAL_SIZE, (0.14, 1.0), True, blur_p=0.1, solarize_p=0.2, **DINO_COLOUR)
DINO_LOCAL = ViewSpec(LOCAL_SIZE, (0.05, 0.14), True, blur_p=0.5, **DINO_COLOUR)
SIMCLR = ViewSpec(GLOBAL_SIZE, (0.08, 1.0), False, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                  flip_last=True)
LINEAR_PROB = ViewSpec(GLOBAL_SIZE, (0.08, 1.0), False)

RECIPES: dict[str, Recipe] = {
    "val": Recipe((CentreCropSpec(bicubic=False),), (1,)),
    "val_bicubic_inter": Recipe((CentreCropSpec(bicubic=True),), (1,)),
    "linear_prob": Recipe((LINEAR_PROB,), (1,)),
    "simclr": Recipe((SIMCLR,), None),
    "dino": Recipe((DINO_GLOBAL_1, DINO_GLOBAL_2), (2, 3, 4)),  # 3 views [1, 2, 1], 4 views [1, 2, 1, 2]
    "dino_multicrop": Recipe((DINO_GLOBAL_1, DINO_GLOBAL_2) + (DINO_LOCAL,) * N_LOCAL_VIEWS, (2 + N_LOCAL_VIEWS,)),
}


def recipe_views(transform_type: str, n_augs: int) -> list[View]:
    """The `n_augs` views of recipe `transform_type`; ConfigError for an unknown recipe or a view count
    it does not make."""
    if transform_type not in RECIPES:
        valid = ", ".join(RECIPES)
        raise ConfigError(f"transform_type: unknown recipe {transform_type!r}; valid recipes: {valid}")
    recipe = RECIPES[transform_type]
    allowed = recipe.n_augs
    if n_augs < 1 or (allowed is not None and n_augs not in allowed):
        expected = "at least 1" if allowed is None else " or ".join(map(str, allowed))
        raise ConfigError(f"n_augs: transform_type '{transform_type}' makes {expected} views, got n_augs={n_augs}")
    return [recipe.views[i % len(recipe.views)] for i in range(n_augs)]

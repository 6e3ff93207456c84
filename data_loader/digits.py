"""The quickstart's `digits_dataloader`: scikit-learn's bundled digits (1,797 8x8 images, 10 classes).

A fixed stratified split holds out 500 images (the k-NN queries); the other 1,297 train and form the
k-NN bank. The split is scikit-learn's `train_test_split(stratify=labels, test_size=500,
random_state=0)`, stored in `digits_split.json`; the images are read from scikit-learn's own copy of
the file without importing scikit-learn, which takes seconds in every process that trains.

Batches are upsampled to `image_size` and augmented on tensors in this process: small affine warps
and contrast changes, no flips (a flipped 2 is no digit).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from data_loader.base import (
    DataError,
    Loader,
    LoaderRuntime,
    balanced_part,
    batch_generator,
    epoch_generator,
    train_indices,
)
from utils.config import ConfigError
from utils.registry import DATALOADERS

SPLIT = Path(__file__).with_name("digits_split.json")  # {"train": [1297 indices], "test": [500]}, in sklearn's order
MEAN, STD = 0.3, 0.4  # of the upsampled images, roughly


@lru_cache(maxsize=1)
def load_digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'train': (images [1297, 8, 8] in [0, 1], labels [1297]), 'test': (... [500] ...)}."""
    images, labels = load_digits()
    split = json.loads(SPLIT.read_text())
    return {part: (images[split[part]], labels[split[part]]) for part in ("train", "test")}


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as `sklearn.datasets.load_digits` gives them: images `[1797, 8, 8]` float32
    in [0, 1] (its 0-16 levels / 16) and labels `[1797]` int64."""
    sklearn = importlib.util.find_spec("sklearn")
    csv = Path(sklearn.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if sklearn else None
    if csv is not None and csv.is_file():
        with gzip.open(csv, "rt") as f:  # 64 pixel columns and the label, as scikit-learn reads it
            rows = np.loadtxt(f, delimiter=",")
        pixels, target = rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)
    else:  # scikit-learn moved its copy (or is missing: the import says so)
        from sklearn.datasets import load_digits as sklearn_digits

        digits = sklearn_digits()
        pixels, target = digits.images, digits.target
    return torch.tensor(pixels, dtype=torch.float32) / 16.0, torch.tensor(target, dtype=torch.int64)


def prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[b, 8, 8]` in [0, 1] -> `[b, 3, size, size]`, upsampled and normalised."""
    x = F.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return ((x - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()


def augment(images: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random view per image: a small affine warp (rotation up to 10 degrees, scale 0.9-1.05,
    shear, shift), then contrast and brightness. `[b, 8, 8]` -> `[b, 3, size, size]`. Pixel noise or
    warps twice as strong cost the quickstart 5-10 k-NN points."""
    b = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    angle = uniform(-10, 10) * math.pi / 180
    scale = uniform(0.9, 1.05)
    shear = uniform(-0.1, 0.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        (torch.stack((cos, -sin + shear, uniform(-0.1, 0.1)), 1), torch.stack((sin, cos, uniform(-0.1, 0.1)), 1)), 1
    )
    x = F.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    x = x * uniform(0.8, 1.2).view(b, 1, 1, 1) + uniform(-0.1, 0.1).view(b, 1, 1, 1)
    return ((x - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()


@DATALOADERS.register("digits_dataloader")
class DigitsLoader(Loader):
    """Batches of the 1,297 training digits (`train`) or the 500 held out. `transform_type`:
    `digits` (random views) or `val` (the upsampled image, one view); `shuffle` with `train`: a
    training pass; `image_size`: the views' side; `num_workers` is accepted and unused."""

    def __init__(self, runtime: LoaderRuntime, batch_size: int, train: bool = True,
                 transform_type: Literal["digits", "val"] = "val", n_augs: int = 1, shuffle: bool = False,
                 image_size: int = 16, num_workers: int = 0):
        if transform_type == "val" and n_augs != 1:
            raise ConfigError(f"n_augs: transform_type 'val' gives one view, got n_augs={n_augs}")
        super().__init__(runtime, batch_size, train and shuffle, n_augs)
        self.split = "train" if train else "test"
        self.augmented = transform_type == "digits"
        self.shuffle = shuffle
        self.image_size = image_size

    @property
    def num_samples(self) -> int:
        return len(load_digits_split()[self.split][1])

    def _batches(self) -> list[torch.Tensor]:
        n = self.num_samples
        if self.training:
            gen = epoch_generator(self.runtime.seed, self.epoch)
            return train_indices(n, self.global_batch_size, gen, self.runtime.rank, self.runtime.world_size, True)
        local = torch.tensor(balanced_part(n, self.runtime.rank, self.runtime.world_size, round_up=True))
        return list(local.split(self.batch_size)) if len(local) else []

    def __len__(self) -> int:
        return len(self._batches())

    def check_data(self, num_classes: Optional[int] = None, key: str = "num_classes") -> None:
        """The digits ship with scikit-learn: only fewer than 10 classes is an error."""
        if num_classes is not None and num_classes < 10:
            raise DataError(f"{key}: {num_classes}, but the digits have 10 classes")

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        images, labels = load_digits_split()[self.split]
        for step, index in enumerate(self._batches()[self.start_step:], start=self.start_step):
            batch = images[index]
            if self.augmented:
                gen = batch_generator(self.runtime.seed + 1, self.epoch, step, self.runtime.rank)
                views = [augment(batch, self.image_size, gen) for _ in range(self.n_augs)]
            else:
                views = [prepare(batch, self.image_size)]
            yield views, labels[index]

"""The quickstart dataset: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes).

Nothing is downloaded. A fixed stratified split keeps 500 images held out for the k-NN queries;
the other 1,297 train the encoder and form the k-NN bank. The images are upsampled to
`image_size` and augmented in batches on tensors (digits suit small affine warps and contrast
changes; no flips, which would turn a 2 into something else).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F

from data_loader.base import (
    DataError,
    LoaderRuntime,
    batch_generator,
    epoch_generator,
    eval_shard,
    per_process_batch,
    train_indices,
)
from utils.config import ConfigError
from utils.registry import DATALOADERS

HELD_OUT = 500
SPLIT_SEED = 0
MEAN, STD = 0.3, 0.4  # of the upsampled images, roughly


@lru_cache(maxsize=1)
def load_digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'train': (images [1297, 8, 8] in [0, 1], labels [1297]), 'test': (... [500] ...)}."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=HELD_OUT, stratify=labels.numpy(), random_state=SPLIT_SEED
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return {"train": (images[train_idx], labels[train_idx]), "test": (images[test_idx], labels[test_idx])}


def prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[b, 8, 8]` in [0, 1] -> `[b, 3, size, size]`, upsampled and normalised."""
    x = F.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return ((x - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()


def augment(images: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random view per image: a small affine warp (rotation up to 10 degrees, scale 0.9-1.05,
    shear, shift), then contrast and brightness. `[b, 8, 8]` -> `[b, 3, size, size]`.

    Measured on the quickstart: pixel noise or warps twice as strong cost 5-10 k-NN points.
    """
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
class DigitsLoader:
    """Batches of the bundled digits.

    Args:
        runtime: rank, world size and seed (given by the program).
        batch_size: the global batch.
        train: the 1,297-image training split (true) or the 500 held-out images (false).
        transform_type: `digits` (random views) or `val` (the plain upsampled image).
        n_augs: views per image.
        shuffle: with `train`, a training pass: reshuffled every epoch, the last partial batch dropped;
            otherwise every sample once, in dataset order.
        image_size: side of the upsampled images.
        num_workers: accepted for symmetry with the other loaders; the digits are augmented in the
            main process (a batch takes milliseconds).
    """

    def __init__(self, runtime: LoaderRuntime, batch_size: int, train: bool = True,
                 transform_type: Literal["digits", "val"] = "val", n_augs: int = 1, shuffle: bool = False,
                 image_size: int = 16, num_workers: int = 0):
        if transform_type == "val" and n_augs != 1:
            raise ConfigError(f"n_augs: transform_type 'val' gives one view, got n_augs={n_augs}")
        self.runtime = runtime
        self.global_batch_size = batch_size
        self.batch_size = per_process_batch(batch_size, runtime.world_size)
        self.split = "train" if train else "test"
        self.augmented = transform_type == "digits"
        self.n_augs = n_augs
        self.shuffle = shuffle
        self.training = train and shuffle  # a training pass: reshuffled, full batches only
        self.gpu_recipe = None  # augmented on tensors already
        self.image_size = image_size
        self.epoch = 0
        self.start_step = 0

    @property
    def num_samples(self) -> int:
        """Samples in the split (all processes together)."""
        return len(load_digits_split()[self.split][1])

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _batches(self) -> list[torch.Tensor]:
        n = self.num_samples
        if self.training:
            gen = epoch_generator(self.runtime.seed, self.epoch)
            return train_indices(n, self.global_batch_size, gen, self.runtime.rank, self.runtime.world_size, True)
        local = torch.tensor(eval_shard(n, self.runtime.rank, self.runtime.world_size))
        return list(local.split(self.batch_size)) if len(local) else []

    def __len__(self) -> int:
        return len(self._batches())

    def check_data(self, num_classes: Optional[int] = None, key: str = "num_classes") -> None:
        """The digits ship with scikit-learn; an evaluator of theirs (`num_classes`, set at config
        key `key`) needs 10 classes."""
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

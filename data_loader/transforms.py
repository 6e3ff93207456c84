"""The PIL pipeline of the recipes (`data_loader.recipes`), run per image in the loader workers, and
batch collation. All its randomness comes from torch's generator, as torchvision's does, so a
seeded DataLoader worker augments deterministically.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from data_loader.recipes import MEAN, STD, CentreCropSpec, View, recipe_views

BICUBIC = T.InterpolationMode.BICUBIC

Batch = tuple[list[torch.Tensor], torch.Tensor]  # (n_augs x [b, 3, H, W] float, labels [b] int64)


def collate_views(samples: Sequence[tuple[list[torch.Tensor], int]]) -> Batch:
    """[(views: n_augs x [3, H, W], label), ...] (b samples) -> (n_augs x [b, 3, H, W], labels int64 [b])."""
    n_views = len(samples[0][0])
    views = [torch.stack([views[i] for views, _ in samples]) for i in range(n_views)]
    return views, _labels(samples)


@dataclasses.dataclass(frozen=True)
class PackedFiles:
    """A batch's image files in one buffer: `data` uint8 `[total bytes]`, `ends` int64 `[b]` (file i
    is `data[ends[i - 1]:ends[i]]`, a view), so that workers hand them over in shared memory, not
    pickled."""

    data: torch.Tensor
    ends: torch.Tensor

    @staticmethod
    def pack(files: Sequence[bytes]) -> PackedFiles:
        lengths = torch.tensor([len(f) for f in files], dtype=torch.int64)
        buffer = bytearray().join(files)
        data = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
        return PackedFiles(data, lengths.cumsum(0))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.data[start : int(self.ends[i])]

    def unpack(self) -> list[torch.Tensor]:
        """The b files as 1-D uint8 views of the buffer."""
        return list(self.data.tensor_split(self.ends[:-1]))


@dataclasses.dataclass(frozen=True)
class PackedImages:
    """A batch's decoded RGB images in one buffer: `data` uint8 `[sum of H_i W_i 3]` (channel-last, as
    PIL decodes) and `shapes` int64 `[b, 2]` (H_i, W_i); the workers' batch with `decode_on: cpu`,
    pinned by the DataLoader and copied to the GPU in one transfer."""

    data: torch.Tensor
    shapes: torch.Tensor

    @staticmethod
    def pack(images: Sequence[torch.Tensor]) -> PackedImages:
        """b uint8 images `[H_i, W_i, 3]` -> one buffer."""
        shapes = torch.tensor([image.shape[:2] for image in images], dtype=torch.int64).view(-1, 2)
        data = torch.cat([image.reshape(-1) for image in images]) if images else torch.empty(0, dtype=torch.uint8)
        return PackedImages(data, shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def pin_memory(self) -> PackedImages:
        return PackedImages(self.data.pin_memory(), self.shapes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedImages:
        return PackedImages(self.data.to(device, non_blocking=non_blocking), self.shapes)

    def unpack(self) -> list[torch.Tensor]:
        """The b images as uint8 `[3, H_i, W_i]` views of the buffer (channel-last in memory)."""
        shapes = self.shapes.tolist()
        parts = self.data.split([h * w * 3 for h, w in shapes])
        return [part.view(h, w, 3).permute(2, 0, 1) for part, (h, w) in zip(parts, shapes)]


def image_array(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 `[H, W, 3]`: the loader workers' only step with `decode_on: cpu`."""
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def collate_bytes(samples: Sequence[tuple[bytes, int]]) -> tuple[PackedFiles, torch.Tensor]:
    """[(file bytes, label), ...] (b samples) -> (`PackedFiles`, labels int64 `[b]`)."""
    return PackedFiles.pack([data for data, _ in samples]), _labels(samples)


def collate_images(samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[PackedImages, torch.Tensor]:
    """[(uint8 image `[H, W, 3]`, label), ...] (b samples) -> (`PackedImages`, labels int64 `[b]`)."""
    return PackedImages.pack([image for image, _ in samples]), _labels(samples)


def _labels(samples: Sequence[tuple[object, int]]) -> torch.Tensor:
    return torch.tensor([label for _, label in samples], dtype=torch.int64)


def collate_for(transform: Callable | None) -> Callable:
    """The collate function for the workers' step `transform`: a recipe, `image_array` or None (files)."""
    if transform is None:
        return collate_bytes
    return collate_images if transform is image_array else collate_views


# ----------------------------------------------------------------------------- PIL augmentations


class RandomGaussianBlur:
    """With probability `p`, PIL's Gaussian blur of a radius (std) uniform in [radius_min, radius_max]."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p < 1.0 and torch.rand(()).item() >= self.p:
            return image
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class RandomSolarize:
    """With probability `p`, PIL's solarisation (invert the pixels above 128)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if torch.rand(()).item() < self.p else image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def _finish(*steps: Callable) -> T.Compose:
    """The recipe's PIL steps followed by ToTensor and ImageNet normalisation."""
    return T.Compose([*steps, T.ToTensor(), T.Normalize(MEAN, STD)])


def pil_view(spec: View) -> T.Compose:
    """One view's PIL steps, PIL image -> `[3, H, W]`; steps of probability 0 are left out (they would
    draw random numbers)."""
    interpolation = BICUBIC if spec.bicubic else T.InterpolationMode.BILINEAR
    if isinstance(spec, CentreCropSpec):
        return _finish(T.Resize(spec.resize, interpolation=interpolation), T.CenterCrop(spec.size))
    steps = [T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, interpolation=interpolation)]
    flip = T.RandomHorizontalFlip(p=spec.flip_p)
    if spec.flip_p > 0 and not spec.flip_last:
        steps.append(flip)
    if spec.jitter_p > 0:
        steps.append(T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.gray_p > 0:
        steps.append(T.RandomGrayscale(p=spec.gray_p))
    if spec.blur_p > 0:
        steps.append(RandomGaussianBlur(spec.blur_p, *spec.blur_sigma))
    if spec.solarize_p > 0:
        steps.append(RandomSolarize(spec.solarize_p))
    if spec.flip_p > 0 and spec.flip_last:
        steps.append(flip)
    return _finish(*steps)


# ----------------------------------------------------------------------------- recipes


class MultiView:
    """Applies `views[i]` to the image for view i: PIL image -> n_augs x `[3, H, W]`."""

    def __init__(self, views: Sequence[Callable]):
        self.views = list(views)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [view(image) for view in self.views]

    def __len__(self) -> int:
        return len(self.views)


def build_transform(transform_type: str, n_augs: int = 1) -> MultiView:
    """Recipe `transform_type` as a callable PIL image -> n_augs x normalised float `[3, H, W]` (view
    order); ConfigError as `recipe_views`."""
    views = recipe_views(transform_type, n_augs)
    built = {spec: pil_view(spec) for spec in dict.fromkeys(views)}
    return MultiView([built[spec] for spec in views])

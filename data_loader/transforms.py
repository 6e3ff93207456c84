"""Augmentation recipes of the paper (SPEC 5), image decoding, and batch collation.

`build_transform(transform_type, n_augs)` returns a callable that turns one PIL image into a list of
`n_augs` normalised float tensors `[3, H, W]` (one per view, in view order). The recipes:

- `val`: Resize(256), CenterCrop(224). `val_bicubic_inter`: the same with a bicubic resize.
- `linear_prob`: RandomResizedCrop(224), horizontal flip.
- `simclr`: the SimCLR recipe, the same for every view.
- `dino`: DINO's two global views; 3 views are [1, 2, 1] and 4 views [1, 2, 1, 2].
- `dino_multicrop`: the two DINO global views (224 px) and 6 local views (96 px).

All randomness comes from torch's generator (torchvision's own transforms use it too), so a
DataLoader worker seeded through the loader's `generator` augments deterministically.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable, Literal, Sequence, get_args

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from utils.config import ConfigError

TransformType = Literal["val", "val_bicubic_inter", "linear_prob", "simclr", "dino", "dino_multicrop"]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC
GLOBAL_SIZE, LOCAL_SIZE = 224, 96
N_LOCAL_VIEWS = 6

Batch = tuple[list[torch.Tensor], torch.Tensor]  # (n_augs x [b, 3, H, W] float, labels [b] int64)


class UndecodableImageError(ValueError):
    """An image file that PIL cannot read (truncated, corrupt, not an image)."""


def decode_image(data: bytes, source: str) -> Image.Image:
    """Decode image bytes (JPEG, PNG, ... whatever the name says) into an RGB PIL image.

    CMYK, grayscale, palette and RGBA images are converted to RGB. Raises UndecodableImageError
    naming `source` when the bytes are not a complete image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes now: a truncated file fails here, not inside a transform
            return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UndecodableImageError(f"{source}: cannot decode the image ({err})") from err


def collate_views(samples: Sequence[tuple[list[torch.Tensor], int]]) -> Batch:
    """[(views: n_augs x [3, H, W], label), ...] (b samples) -> (n_augs x [b, 3, H, W], labels int64 [b])."""
    n_views = len(samples[0][0])
    views = [torch.stack([views[i] for views, _ in samples]) for i in range(n_views)]
    return views, _labels(samples)


@dataclasses.dataclass(frozen=True)
class PackedFiles:
    """The image files of a batch in one buffer: `data` uint8 `[total bytes]`, `ends` int64 `[b]`
    (file i is `data[ends[i - 1]:ends[i]]`). A loader worker hands a batch to the training process
    as these two tensors, through shared memory, instead of pickling b `bytes` objects through a
    pipe; `files[i]` is a view, not a copy."""

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
    """The decoded RGB images of a batch in one buffer: `data` uint8 `[sum of H_i W_i 3]` (image i
    channel-last, as PIL decodes it) and `shapes` int64 `[b, 2]` (H_i, W_i). What loader workers hand
    over with `augment_on: gpu, decode_on: cpu`: one tensor through shared memory, pinned by the
    DataLoader (`pin_memory`) and copied to the GPU in one transfer (`to`)."""

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
    """[(JPEG file bytes, label), ...] (b samples) -> (the b files packed, labels int64 [b]); for
    `augment_on: gpu`, where decoding and augmentation happen on the GPU (data_loader.gpu_augment)."""
    return PackedFiles.pack([data for data, _ in samples]), _labels(samples)


def collate_images(samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[PackedImages, torch.Tensor]:
    """[(uint8 image [H, W, 3], label), ...] (b samples) -> (the b images packed, labels int64 [b]);
    for `augment_on: gpu, decode_on: cpu`, where the workers decode and the GPU augments."""
    return PackedImages.pack([image for image, _ in samples]), _labels(samples)


def _labels(samples: Sequence[tuple[object, int]]) -> torch.Tensor:
    return torch.tensor([label for _, label in samples], dtype=torch.int64)


def collate_for(transform: Callable | None) -> Callable:
    """The collate function of a loader whose workers apply `transform` to each decoded image: a
    recipe (views), `image_array` (decoded images) or None (the files, undecoded)."""
    if transform is None:
        return collate_bytes
    return collate_images if transform is image_array else collate_views


# ----------------------------------------------------------------------------- PIL augmentations


class RandomGaussianBlur:
    """With probability `p`, PIL's Gaussian blur with a radius (standard deviation) uniform in
    [radius_min, radius_max]."""

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


def _dino_colour(blur_p: float) -> list[Callable]:
    """DINO's flip, colour jitter, grayscale and blur (the steps after the crop)."""
    return [
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        RandomGaussianBlur(p=blur_p),
    ]


def dino_views() -> tuple[T.Compose, T.Compose]:
    """DINO's two global views: view 1 always blurred; view 2 blurred with p 0.1 and solarised with
    p 0.2. Both `[3, 224, 224]`."""
    crop = T.RandomResizedCrop(GLOBAL_SIZE, scale=(0.14, 1.0), interpolation=BICUBIC)
    view1 = _finish(crop, *_dino_colour(blur_p=1.0))
    view2 = _finish(crop, *_dino_colour(blur_p=0.1), RandomSolarize(p=0.2))
    return view1, view2


def dino_local_view() -> T.Compose:
    """DINO's small view: a 96 px crop of 5-14% of the image, blurred with p 0.5. `[3, 96, 96]`."""
    crop = T.RandomResizedCrop(LOCAL_SIZE, scale=(0.05, 0.14), interpolation=BICUBIC)
    return _finish(crop, *_dino_colour(blur_p=0.5))


def simclr_view() -> T.Compose:
    """SimCLR's recipe (strong colour jitter, blur with p 0.5). `[3, 224, 224]`."""
    return _finish(
        T.RandomResizedCrop(GLOBAL_SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
        RandomGaussianBlur(p=0.5),
        T.RandomHorizontalFlip(),
    )


# ----------------------------------------------------------------------------- recipes


class MultiView:
    """Applies `views[i]` to the image for view i: PIL image -> n_augs x `[3, H, W]`."""

    def __init__(self, views: Sequence[Callable]):
        self.views = list(views)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [view(image) for view in self.views]

    def __len__(self) -> int:
        return len(self.views)


def _check_n_augs(transform_type: str, n_augs: int, allowed: Sequence[int] | None) -> None:
    if n_augs < 1 or (allowed is not None and n_augs not in allowed):
        expected = "at least 1" if allowed is None else " or ".join(map(str, allowed))
        raise ConfigError(f"n_augs: transform_type '{transform_type}' makes {expected} views, got n_augs={n_augs}")


def build_transform(transform_type: str, n_augs: int = 1) -> MultiView:
    """The recipe `transform_type` for `n_augs` views: a callable PIL image -> n_augs x `[3, H, W]`.

    Raises ConfigError for an unknown recipe or a view count the recipe does not make: `val`,
    `val_bicubic_inter` and `linear_prob` make 1 view, `simclr` any number, `dino` 2 to 4,
    `dino_multicrop` 8 (2 global + 6 local).
    """
    if transform_type in ("val", "val_bicubic_inter"):
        _check_n_augs(transform_type, n_augs, (1,))
        interpolation = BICUBIC if transform_type == "val_bicubic_inter" else T.InterpolationMode.BILINEAR
        return MultiView([_finish(T.Resize(256, interpolation=interpolation), T.CenterCrop(GLOBAL_SIZE))])
    if transform_type == "linear_prob":
        _check_n_augs(transform_type, n_augs, (1,))
        return MultiView([_finish(T.RandomResizedCrop(GLOBAL_SIZE), T.RandomHorizontalFlip())])
    if transform_type == "simclr":
        _check_n_augs(transform_type, n_augs, None)
        return MultiView([simclr_view()] * n_augs)
    if transform_type == "dino":
        _check_n_augs(transform_type, n_augs, (2, 3, 4))
        view1, view2 = dino_views()
        return MultiView([view1, view2, view1, view2][:n_augs])
    if transform_type == "dino_multicrop":
        _check_n_augs(transform_type, n_augs, (2 + N_LOCAL_VIEWS,))
        return MultiView([*dino_views(), *[dino_local_view()] * N_LOCAL_VIEWS])
    valid = ", ".join(get_args(TransformType))
    raise ConfigError(f"transform_type: unknown recipe {transform_type!r}; valid recipes: {valid}")

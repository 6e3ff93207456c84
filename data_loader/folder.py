"""An image-folder tree (`docs/reference.md §5`): the `image_folder_dataloader`.

`root/train/<class>/*` and `root/val/<class>/*`; the class indices are the sorted folder names of
`root/train` for both splits (a val split missing a class keeps the train split's indices). Images
directly in `root/train/` (none in class folders) are unlabelled (`UNLABELLED`): they train, but
cannot feed an evaluator. The folder is scanned on first use.

- Training: each epoch one permutation from (seed, epoch); an undecodable image is skipped with a
  warning and a new view of another image of the batch takes its place (the batch keeps its size,
  which the losses' gathers need).
- Evaluation: process r takes a contiguous part (`balanced_part`), permuted when `shuffle`; an
  undecodable image is an error naming the file.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

from data_loader.base import (
    DataError,
    Loader,
    LoaderRuntime,
    balanced_part,
    epoch_generator,
    loader_batches,
    train_indices,
)
from data_loader.decode import UndecodableImageError, decode_image
from data_loader.gpu_augment import DecodeOn, gpu_and_worker_steps
from data_loader.recipes import TransformType
from data_loader.transforms import Batch, collate_for
from utils.logging import get_logger
from utils.registry import DATALOADERS

UNLABELLED = -1  # the label of the images of a `train/` folder without class folders


def is_image_file(path: str) -> bool:
    """An image by its extension, and not hidden (macOS's `._name.jpg` companions are not images)."""
    name = os.path.basename(path)
    return not name.startswith(".") and has_file_allowed_extension(name, IMG_EXTENSIONS)


def image_tree(folder: Path) -> tuple[list[str], list[str]]:
    """(class folder names, paths of the image files directly inside), both sorted, hidden entries
    (`.ipynb_checkpoints`, `._name.jpg`) left out."""
    entries = sorted(folder.iterdir())
    classes = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
    return classes, [str(p) for p in entries if p.is_file() and is_image_file(str(p))]


def scan_split(root: Path, split: str) -> list[tuple[str, int]]:
    """[(image path, class index)] of `root/split`, sorted by class then file name; for unlabelled
    images (train split only) [(image path, UNLABELLED)] sorted by name. DataError for a tree that
    is neither."""
    train_dir, split_dir = root / "train", root / split
    for folder in (train_dir, split_dir):
        if not folder.is_dir():
            raise DataError(f"root: {folder}: no such folder (image_folder_dataloader reads root/train/<class>/* "
                            f"and root/val/<class>/*, or unlabelled images in root/train/)")
    classes, loose = image_tree(train_dir)
    if loose and classes:
        raise DataError(f"root: {train_dir} holds {len(classes)} class folders and {len(loose)} image files "
                        f"outside them ({Path(loose[0]).name}, ...): put every image in a class folder, or, "
                        f"to train without labels, every image directly in {train_dir}")
    if loose:
        if split != "train":
            raise DataError(f"root: {split_dir}: the images of {train_dir} are not in class folders (unlabelled), "
                            f"so there are no classes to read {split_dir} by")
        return [(path, UNLABELLED) for path in loose]
    if not classes:
        raise DataError(f"root: {train_dir}: no class folders and no image files ({', '.join(IMG_EXTENSIONS)})")
    unknown = sorted(set(image_tree(split_dir)[0]) - set(classes))
    if unknown:
        raise DataError(f"root: {split_dir}: class folders {unknown[:5]} are not in {train_dir}")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = make_dataset(split_dir, class_to_idx, is_valid_file=is_image_file, allow_empty=True)
    if not samples:
        raise DataError(f"root: {split_dir}: no image files ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    return samples


class FolderBatches(Dataset):
    """`dataset[indices]`: the batch of `samples` [(image path, class index)] at `indices`, each
    image through `transform`, the workers' step after decoding (`gpu_and_worker_steps`; None hands
    over the files). `training`: undecodable images are replaced (the module docstring)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None, training: bool):
        self.samples, self.transform, self.training = samples, transform, training
        self.skipped = 0  # in this reader (the main process or one worker), this epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[list[torch.Tensor], int]:
        """(the worker step's output for one image, its class index)."""
        path, label = self.samples[index]
        with open(path, "rb") as f:
            data = f.read()
        if self.transform is None:  # augment_on: gpu, decoded there: the file as it is
            return data, label
        return self.transform(decode_image(data, path)), label

    def __getitem__(self, indices: list[int]) -> Batch:
        loaded, decoded, failed = [], [], []
        for i in indices:
            try:
                loaded.append(self.load(i))
                decoded.append(i)
            except UndecodableImageError as err:
                if not self.training:
                    raise
                failed.append(str(err))
        if failed:
            self._report(failed, len(indices))
            loaded += [self.load(decoded[k % len(decoded)]) for k in range(len(failed))]
        return collate_for(self.transform)(loaded)

    def _report(self, failed: list[str], batch: int) -> None:
        if len(failed) == batch:
            raise RuntimeError(f"no image of a training batch could be decoded: {failed}")
        self.skipped += len(failed)
        get_logger().warning("skipped %d undecodable training image(s) (%d skipped by this reader in this epoch); "
                             "new views of other images of the batch take their places: %s",
                             len(failed), self.skipped, "; ".join(failed))


@DATALOADERS.register("image_folder_dataloader")
class ImageFolderLoader(Loader):
    """Batches of `root/train` (`train`) or `root/val`; `shuffle`: a new order every epoch, with
    `train` a training pass."""

    def __init__(self, runtime: LoaderRuntime, root: str, shuffle: bool, batch_size: int, num_workers: int = 0,
                 train: bool = True, transform_type: TransformType = "val", n_augs: int = 1,
                 augment_on: Literal["cpu", "gpu"] = "cpu", decode_on: DecodeOn = None):
        super().__init__(runtime, batch_size, train and shuffle, n_augs)
        self.root = Path(root)
        self.split = "train" if train else "val"
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.gpu_recipe, self.transform = gpu_and_worker_steps(augment_on, decode_on, transform_type, n_augs,
                                                               self.training)
        self._samples: list[tuple[str, int]] | None = None

    @property
    def samples(self) -> list[tuple[str, int]]:
        """[(image path, class index)] of the split, scanned on first use."""
        if self._samples is None:
            self._samples = scan_split(self.root, self.split)
            get_logger().info("%s: %d images", self.root / self.split, len(self._samples))
        return self._samples

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def batches(self) -> list[list[int]]:
        """This process's batches of sample indices for the current epoch."""
        n, rank, world = self.num_samples, self.runtime.rank, self.runtime.world_size
        gen = epoch_generator(self.runtime.seed, self.epoch)
        if self.training:
            steps = train_indices(n, self.global_batch_size, gen, rank, world, shuffle=True)
            if not steps:
                raise DataError(f"batch_size: {self.root / self.split} has {n} images, fewer than one batch of "
                                f"{self.global_batch_size} (with train: true and shuffle: true the last partial "
                                f"batch is dropped)")
            return [step.tolist() for step in steps]
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        part = balanced_part(n, rank, world, round_up=True)
        return [chunk.tolist() for chunk in order[part.start:part.stop].split(self.batch_size)]

    def __len__(self) -> int:
        return len(self.batches())

    def check_data(self, num_classes: Optional[int] = None, key: str = "num_classes") -> None:
        """Scans the split; it must make a batch."""
        if num_classes is not None:
            if self.samples[0][1] == UNLABELLED:
                raise DataError(f"root: {self.root / self.split}: the images are not in class folders (unlabelled); "
                                f"the evaluators need classes: set `evaluator: null` and `valid_dataloader: null` "
                                f"to train on them (configs/examples/own_images.yaml)")
            classes = len(image_tree(self.root / "train")[0])  # the labels index these
            if classes > num_classes:
                raise DataError(f"{key}: {num_classes}, but {self.root / 'train'} has {classes} class folders")
        len(self)

    def __iter__(self) -> Iterator[Batch]:
        dataset = FolderBatches(self.samples, self.transform, self.training)
        seeds = epoch_generator(self.runtime.seed + 1, self.epoch, self.runtime.rank)
        batches = loader_batches(dataset, seeds, self.num_workers, self.gpu_recipe is None, sampler=self.batches())
        yield from itertools.islice(batches, self.start_step, None)

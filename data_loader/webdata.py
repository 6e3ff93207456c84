"""WebDataset shards (`docs/reference.md §5`): the `web_dataloader` of the paper's configs.

A shard is a tar file of samples `KEY.image.jpg` (the original bytes) and `KEY.metadata.pyd` (a
pickled dict with the class index `cls`), as `preprocessing/create_tar_webdataset.py` writes them.

- Training: each epoch one shard permutation from (seed, epoch); process r takes every
  world_size-th shard of it, each of its workers every num_workers-th of those, read round and
  round through a shuffle buffer of `shuffle` samples, so that `dataset_size // batch_size` full
  batches never run short. Undecodable images and the rest of a shard cut short are skipped with
  a warning.
- Evaluation: process r reads a contiguous run of shards (`balanced_part`), its workers split
  it, each yielding its samples in shard order (several workers' batches interleave); an
  undecodable image or a shard cut short is an error naming the shard.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import random
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data_loader.base import DataError, Loader, LoaderRuntime, balanced_part, epoch_generator, loader_batches
from data_loader.decode import UndecodableImageError, decode_image
from data_loader.gpu_augment import DecodeOn, gpu_and_worker_steps
from data_loader.recipes import TransformType
from data_loader.transforms import Batch, collate_for
from utils.config import ConfigError
from utils.logging import get_logger
from utils.registry import DATALOADERS

SAMPLE_FILES = ("image.jpg", "metadata.pyd")  # the files of a sample, as the shard writer names them


class ShardError(DataError):
    """A shard that cannot be read to its end: cut short (a copy that stopped midway) or corrupt."""


def sample_fields(sample: dict) -> tuple[bytes, int, str]:
    """(image bytes, class index, 'shard URL, key KEY') of one raw shard sample."""
    where = f"shard {sample.get('__url__')}, key {sample.get('__key__')}"
    missing = [name for name in SAMPLE_FILES if name not in sample]
    if missing:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"{where}: the sample lacks {missing} (it holds {present})")
    return sample["image.jpg"], int(pickle.loads(sample["metadata.pyd"])["cls"]), where


class ShardStream(IterableDataset):
    """One process's batches of its shards `urls`, which its DataLoader workers split; `transform` is
    their step after decoding (`gpu_and_worker_steps`). `training`: endless, full batches, bad data
    skipped; else one pass, an error handed over as the last item (`handed_over`). `seed_key` names
    (seed, epoch, rank) for the shuffle buffer of `shuffle` samples."""

    def __init__(self, urls: list[str], transform: Callable | None, batch_size: int, training: bool, shuffle: int,
                 seed_key: str):
        super().__init__()
        self.urls, self.transform, self.batch_size = urls, transform, batch_size
        self.training, self.shuffle, self.seed_key = training, shuffle, seed_key

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.urls[worker::workers]
        rng = random.Random(f"{self.seed_key}/worker {worker}")
        if self.training:
            samples = endless_samples(urls, rng)
        else:
            samples = itertools.chain.from_iterable(shard_samples(url) for url in urls)
        if self.shuffle > 0:
            samples = wds.shuffle(self.shuffle, rng=rng)(samples)
        collate = collate_for(self.transform)
        batches = wds.batched(self.batch_size, collation_fn=collate, partial=not self.training)
        made = batches(self._transformed(samples))
        return iter(made) if self.training else handed_over(made)

    def _transformed(self, samples: Iterator[dict]) -> Iterator[tuple[list[torch.Tensor], int]]:
        """Raw samples -> (worker step's output, label); undecodable images skipped in training."""
        skipped = 0
        for sample in samples:
            data, label, where = sample_fields(sample)
            if self.transform is None:  # augment_on: gpu, decoded there
                yield data, label
                continue
            try:
                image = decode_image(data, where)
            except UndecodableImageError as err:
                if not self.training:
                    raise
                skipped += 1
                get_logger().warning("skipped an undecodable training image (%d skipped by this reader in this "
                                     "epoch): %s", skipped, err)
                continue
            yield self.transform(image), label


def shard_samples(url: str) -> Iterator[dict]:
    """The raw samples of one shard, in order. A shard cut short or not a tar file yields its complete
    samples, then raises ShardError naming it, the samples read and (`listed_samples`) those lost.
    A cut on a boundary between files, or in a 512-byte header, reads as a shorter shard (tarfile
    takes it for the end)."""
    cuts: list[tarfile.TarError] = []

    def stop_at_a_cut(err: Exception) -> bool:  # webdataset's handler: False ends the shard
        if not isinstance(err, tarfile.TarError):
            raise err
        cuts.append(err)
        return False

    read = 0
    for sample in wds.tarfile_samples([{"url": url}], handler=stop_at_a_cut):
        if cuts and any(name not in sample for name in SAMPLE_FILES):
            break  # the sample that the cut went through, handed over incomplete when the shard ended
        read += 1
        yield sample
    if cuts:
        reason = str(cuts[0].args[0]).split(" @ ")[0]  # webdataset appends " @ <the open file>"
        listed = listed_samples(url)
        count = (f"{read} of its {listed} samples read before the cut, {listed - read} lost" if listed is not None
                 else f"{read} samples read before the cut (how many were lost is unknown: no metadata.json beside "
                      f"its folder lists its size)")
        raise ShardError(f"shard {url} is cut short or corrupt ({reason}): {count}; copy it again, or write its "
                         f"split again with --overwrite (README, Data preparation)")


def listed_samples(url: str) -> int | None:
    """The samples of local shard `url` as the `metadata.json` in the folder above lists them, or None."""
    shard = Path(url)
    try:
        listed = json.loads((shard.parent.parent / "metadata.json").read_text())["shard_samples"]
        return int(listed[f"{shard.parent.name}/{shard.name}"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


HANDED_OVER = (ShardError, UndecodableImageError)  # what ends an evaluation pass


def handed_over(batches: Iterator[Batch]) -> Iterator[Batch | Exception]:
    """`batches`, then the HANDED_OVER error that ended them, if any, as the last item, for the loader
    to raise: raised in a worker, it would reach the loader as the worker's whole traceback."""
    try:
        yield from batches
    except HANDED_OVER as err:
        yield err


def endless_samples(urls: list[str], rng: random.Random) -> Iterator[dict]:
    """Raw samples of `urls`, pass after pass, reshuffled by `rng` after each. A shard cut short gives
    the samples before the cut and a warning (once per reader and epoch). DataError when no shard
    holds a readable sample."""
    urls, warned = list(urls), set()
    while True:
        count = 0
        for url in urls:
            try:
                for sample in shard_samples(url):
                    count += 1
                    yield sample
            except ShardError as err:
                if url not in warned:
                    warned.add(url)
                    get_logger().warning("%s. Training skips the rest of it and reads on from the next shard", err)
        if count == 0:
            raise DataError(f"the shards {urls} hold no readable samples")
        rng.shuffle(urls)


@DATALOADERS.register("web_dataloader")
class WebLoader(Loader):
    """Batches of `shards` (a brace pattern: `.../imagenet-train-{000000..000639}.tar`) holding
    `dataset_size` samples. `shuffle`: the buffer in samples; 0 keeps the shard order, even with
    `train` (an evaluation pass). In training each of the world_size x num_workers readers needs a
    shard of its own (ConfigError)."""

    def __init__(self, runtime: LoaderRuntime, shards: str, dataset_size: int, shuffle: int, batch_size: int,
                 num_workers: int = 0, train: bool = True, transform_type: TransformType = "val", n_augs: int = 1,
                 augment_on: Literal["cpu", "gpu"] = "cpu", decode_on: DecodeOn = None):
        self.urls = list(braceexpand.braceexpand(shards))
        super().__init__(runtime, batch_size, train and shuffle > 0, n_augs)
        self.dataset_size = dataset_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.gpu_recipe, self.transform = gpu_and_worker_steps(augment_on, decode_on, transform_type, n_augs,
                                                               self.training)
        self._check()

    def _check(self) -> None:
        if self.dataset_size < 1 or self.shuffle < 0 or self.num_workers < 0:
            raise ConfigError(f"dataset_size {self.dataset_size}, shuffle {self.shuffle}, num_workers "
                              f"{self.num_workers}: dataset_size must be positive, the others not negative")
        if not self.training:
            return
        if self.dataset_size < self.global_batch_size:
            raise ConfigError(f"dataset_size: {self.dataset_size} samples make no training step of "
                              f"{self.global_batch_size}")
        readers = self.runtime.world_size * max(1, self.num_workers)
        if len(self.urls) < readers:
            raise ConfigError(f"shards: {len(self.urls)} shards cannot give each of the {self.runtime.world_size} "
                              f"processes x {max(1, self.num_workers)} workers a shard of its own; lower num_workers")

    @property
    def num_samples(self) -> int:
        return self.dataset_size

    def process_shards(self) -> list[str]:
        """This process's shards for the current epoch, in reading order."""
        order = list(range(len(self.urls)))
        if self.shuffle > 0:
            order = torch.randperm(len(order), generator=epoch_generator(self.runtime.seed, self.epoch)).tolist()
        rank, world = self.runtime.rank, self.runtime.world_size
        if self.training:
            return [self.urls[i] for i in order[rank::world]]
        return [self.urls[order[i]] for i in balanced_part(len(order), rank, world)]

    def __len__(self) -> int:
        """In evaluation an estimate: every shard is taken to hold dataset_size / len(shards) samples."""
        if self.training:
            return self.dataset_size // self.global_batch_size
        per_shard = self.dataset_size / len(self.urls)
        local = len(balanced_part(len(self.urls), self.runtime.rank, self.runtime.world_size))
        workers = max(1, self.num_workers)
        return sum(math.ceil(round(len(range(w, local, workers)) * per_shard) / self.batch_size)
                   for w in range(workers))

    def check_data(self, num_classes: Optional[int] = None, key: str = "num_classes") -> None:
        """Local shard files must exist (URLs and `pipe:` commands are not checked); the classes are
        checked against the shard writer's `metadata.json` above the shards' folder, where it is."""
        local = [url for url in self.urls if "://" not in url and not url.startswith("pipe:")]
        missing = [url for url in local if not os.path.isfile(url)]
        if missing:
            raise DataError(f"shards: {len(missing)} of the {len(self.urls)} shard files do not exist, "
                            f"the first {missing[0]}; write them with preprocessing/create_tar_webdataset.py "
                            f"(README, Data preparation)")
        metadata = Path(local[0]).parent.parent / "metadata.json" if local else None
        if num_classes is None or metadata is None or not metadata.is_file():
            return
        try:
            content = json.loads(metadata.read_text())
        except (OSError, ValueError):
            content = None
        listed = content.get("classes") if isinstance(content, dict) else None
        if not isinstance(listed, list):  # not the shard writer's file: the labels are checked when read
            get_logger().info("%s holds no class list; the labels of %s are checked when read", metadata, local[0])
            return
        classes = len(listed)
        if classes == 0:
            raise DataError(f"shards: {metadata} lists no classes (unlabelled images); the evaluators need "
                            f"classes: set `evaluator: null` and `valid_dataloader: null` to train on them")
        if classes > num_classes:
            raise DataError(f"{key}: {num_classes}, but {metadata} lists {classes} classes")

    def __iter__(self) -> Iterator[Batch]:
        rank, seed = self.runtime.rank, self.runtime.seed
        stream = ShardStream(self.process_shards(), self.transform, self.batch_size, self.training, self.shuffle,
                             seed_key=f"seed {seed}/epoch {self.epoch}/rank {rank}")
        batches = loader_batches(stream, epoch_generator(seed + 1, self.epoch, rank), self.num_workers,
                                 self.gpu_recipe is None)
        if not self.training:
            for step, batch in enumerate(batches):
                if isinstance(batch, HANDED_OVER):  # from `handed_over`
                    batches.close()  # ends the workers now, not when the traceback (holding this frame) is freed
                    raise batch
                if step >= self.start_step:
                    yield batch
            return
        for step in range(len(self)):
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(f"the shard stream ended after {step} of {len(self)} steps")
            if step >= self.start_step:
                yield batch

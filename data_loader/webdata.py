"""ImageNet as WebDataset shards (SPEC 5): the `web_dataloader` of the paper's configs.

A shard is a tar file of samples `KEY.image.jpg` (the original image bytes) and `KEY.metadata.pyd`
(a pickled dict with the class index `cls`), as written by `preprocessing/create_tar_webdataset.py`.
Building a loader reads nothing (a dry run builds the loaders of configs whose data is absent);
shards are opened only when the loader is iterated.

Two modes, chosen by the config:

- Training (`train: true` and `shuffle` > 0). Every epoch the shard list is permuted from
  (seed, epoch), the same permutation on every process; process r takes every world_size-th shard
  of it, and each of its dataloader workers every num_workers-th shard of those. A worker streams
  its shards round and round (reshuffling their order on every new round), through a shuffle buffer
  of `shuffle` samples, and yields batches of exactly the per-process size. The loader stops after
  `dataset_size // batch_size` batches: the same number of steps on every process, none of which can
  run short. Undecodable images are skipped and counted in a warning; so is the unreadable rest of a
  shard cut short (one warning naming the shard and the samples lost; the stream reads on from the next
  shard).
- Evaluation (otherwise). Every sample is read exactly once: process r takes a contiguous run of
  the shard list (the runs differ by at most one shard in length when the shards do not divide
  evenly; a process may then yield fewer batches), its workers split that run, and each worker
  yields its samples in shard order in batches of at most the per-process size. The order is a
  function of the shard list and num_workers, so gathering in rank order gives a deterministic
  order. An undecodable image is an error naming the shard and the key; a shard cut short is a
  ShardError naming it.

Sample shuffling and shard order depend only on (runtime.seed, epoch, rank, worker); the
augmentations too (each epoch's DataLoader draws its workers' seeds from a generator seeded the same
way; with num_workers 0 the recipe gets generators of its own seeded so: `own_randomness`).
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

from data_loader.base import (
    DataError,
    LoaderRuntime,
    epoch_generator,
    loader_batches,
    per_process_batch,
)
from data_loader.decode import UndecodableImageError, decode_image
from data_loader.gpu_augment import DecodeOn, split_work
from data_loader.recipes import TransformType
from data_loader.transforms import Batch, collate_for
from utils.config import ConfigError
from utils.logging import get_logger
from utils.registry import DATALOADERS


def balanced_part(n: int, rank: int, world_size: int) -> range:
    """The contiguous part of n items that process `rank` takes: every item exactly once, the parts
    differing in length by at most one."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


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
    """The batches that one process reads from its shards (split further among DataLoader workers).

    Args:
        urls: this process's shards, in reading order.
        transform: the workers' step after decoding: a recipe (PIL image -> n_augs x `[3, H, W]`),
            `image_array` (-> uint8 `[H, W, 3]`; decode_on: cpu), or None: yield the JPEG bytes
            (augment_on: gpu).
        batch_size: the per-process batch.
        training: stream the shards endlessly, skip undecodable images and the rest of a shard cut
            short, yield full batches only; otherwise one pass, both are errors (handed over as the
            last item, `handed_over`), the last batch of a worker may be short.
        shuffle: shuffle buffer size in samples (0: no shuffling).
        seed_key: a string naming (seed, epoch, rank); the worker id is added to seed the buffer.
    """

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
        """Raw samples -> (views, label); undecodable images skipped in training, errors otherwise."""
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
    """The raw samples of one shard, in order. Where the tar file ends in the middle of a file (cut
    short) or is not a tar file, the complete samples before that point are yielded, then ShardError
    is raised naming the shard, how many were read and, where `listed_samples` knows the shard's
    size, how many were lost. (Python's tarfile takes a cut that falls on
    a boundary between files, or inside a file's 512-byte header, for the end of the archive: such
    a shard reads as a shorter one.)"""
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
    """The samples that the shard writer put in the local shard `url`, as its `metadata.json` (in
    the folder above the shard's) lists them; None where no such file lists the shard."""
    shard = Path(url)
    try:
        listed = json.loads((shard.parent.parent / "metadata.json").read_text())["shard_samples"]
        return int(listed[f"{shard.parent.name}/{shard.name}"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


HANDED_OVER = (ShardError, UndecodableImageError)  # what ends an evaluation pass


def handed_over(batches: Iterator[Batch]) -> Iterator[Batch | Exception]:
    """`batches`, then the error that ended them (HANDED_OVER), if one did, as the last item: the
    loader raises it. A DataLoader worker's exception reaches the loader as a new one whose message
    is the worker's whole traceback; handed over as an item, it stays the one-line message naming
    the shard."""
    try:
        yield from batches
    except HANDED_OVER as err:
        yield err


def endless_samples(urls: list[str], rng: random.Random) -> Iterator[dict]:
    """Raw samples of `urls`, pass after pass (the shard order reshuffled by `rng` for every pass
    after the first), so that a reader never runs out within an epoch. A shard cut short gives the
    samples before the cut and a warning, once per reader and epoch; the stream goes on with the
    next shard, so the epoch keeps its length."""
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
class WebLoader:
    """Batches `(views, labels)` from WebDataset shards (see the module docstring for the modes).

    Args:
        runtime: rank, world size and seed (given by the program).
        shards: the shard files as a brace pattern (`.../imagenet-train-{000000..000639}.tar`).
        dataset_size: samples in the shards (over all processes); training runs
            `dataset_size // batch_size` steps per epoch.
        shuffle: shuffle buffer in samples; 0 keeps the shard order (an evaluation pass).
        batch_size: the global batch; each process yields batch_size / world_size samples per step.
        num_workers: DataLoader worker processes per process.
        train: a training pass (with `shuffle` > 0: endless shards, full batches, a fixed number of
            steps); false: every sample once.
        transform_type: the augmentation recipe (data_loader.transforms).
        n_augs: views per image.
        augment_on: 'cpu' (decode and augment in the workers) or 'gpu' (training only: the batches
            hold the JPEG files, decoded and augmented on the GPU by the trainer; see
            data_loader.gpu_augment).
        decode_on: where the images are decoded; by default where they are augmented. 'cpu' with
            augment_on 'gpu': the workers decode with PIL and hand over the pixels, the GPU augments.
    """

    def __init__(self, runtime: LoaderRuntime, shards: str, dataset_size: int, shuffle: int, batch_size: int,
                 num_workers: int = 0, train: bool = True, transform_type: TransformType = "val", n_augs: int = 1,
                 augment_on: Literal["cpu", "gpu"] = "cpu", decode_on: DecodeOn = None):
        self.runtime = runtime
        self.urls = list(braceexpand.braceexpand(shards))
        self.dataset_size = dataset_size
        self.shuffle = shuffle
        self.global_batch_size = batch_size
        self.batch_size = per_process_batch(batch_size, runtime.world_size)
        self.num_workers = num_workers
        self.training = train and shuffle > 0
        self.gpu_recipe, self.transform = split_work(augment_on, decode_on, transform_type, n_augs, self.training)
        self.n_augs = n_augs
        self.epoch = 0
        self.start_step = 0
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
        """Samples in the shards (all processes together), as the config says."""
        return self.dataset_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Reshuffle for `epoch`; the next pass starts at batch `start_step` (a resumed epoch). The
        batches before it are still read and dropped, so that the workers' random streams match."""
        self.epoch, self.start_step = epoch, start_step

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
        """Steps of one epoch on this process. Exact in training; in evaluation it assumes that every
        shard holds dataset_size / len(shards) samples (true of the ImageNet shards of the configs)."""
        if self.training:
            return self.dataset_size // self.global_batch_size
        per_shard = self.dataset_size / len(self.urls)
        local = len(balanced_part(len(self.urls), self.runtime.rank, self.runtime.world_size))
        workers = max(1, self.num_workers)
        return sum(math.ceil(round(len(range(w, local, workers)) * per_shard) / self.batch_size)
                   for w in range(workers))

    def check_data(self, num_classes: Optional[int] = None, key: str = "num_classes") -> None:
        """DataError when shard files given as local paths do not exist (URLs and `pipe:` commands
        are not checked). With `num_classes` (the loader feeds an evaluator of that many classes),
        also when the shard writer's `metadata.json` beside the shards' folder lists no classes
        (unlabelled images) or more; without that file the labels show only when read."""
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
        in_process = self.num_workers == 0 and self.gpu_recipe is None  # the CPU recipe runs here
        batches = loader_batches(stream, epoch_generator(seed + 1, self.epoch, rank), self.num_workers, in_process)
        if not self.training:
            for step, batch in enumerate(batches):
                if isinstance(batch, HANDED_OVER):  # from `handed_over`
                    # end the workers now: left to the traceback, which holds this frame, they would end
                    # only when it is freed, and the DataLoader would then wait seconds on each
                    batches.close()
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

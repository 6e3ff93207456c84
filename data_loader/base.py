"""What every loader type shares: the `Loader` contract, the process split, seeding, workers."""

from __future__ import annotations

import abc
import atexit
import dataclasses
import multiprocessing
import multiprocessing.resource_tracker
import multiprocessing.util  # its exit function registered before ours, so run after it
import os
import random
import signal
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from utils.config import ConfigError

if TYPE_CHECKING:
    from data_loader.gpu_augment import GpuRecipe


class DataError(ConfigError):
    """The data a loader's config names is missing, cannot fill a batch, or does not fit its
    evaluator. Reported like a bad config value (one line, exit status 2)."""


@dataclasses.dataclass(frozen=True)
class LoaderRuntime:
    """The program's part of a loader's arguments."""

    rank: int = 0
    world_size: int = 1
    seed: int = 0


class Loader(abc.ABC):
    """A dataloader config type (`docs/reference.md §5`), built from its config args and a `LoaderRuntime`.

    Iterating yields batches `(views, labels)`: `views` n_augs float32 tensors `[b, 3, H, W]` in
    view order, `labels` int64 `[b]` (-1: unlabelled), b = `batch_size` = `global_batch_size` (the
    config's) / world_size, or fewer at the end of an evaluation pass. With `gpu_recipe` set, `views`
    is the b files (`PackedFiles`) or decoded images (`PackedImages`) for `gpu_augment.gpu_views`.

    `training` (train: true with shuffling): `len(self)` full batches on every process (the losses'
    collectives need all at every step), process r taking its slice of each global batch. Otherwise
    an evaluation pass: every sample once over all processes, process r a contiguous part
    (`balanced_part`), so gathering in rank order gives a fixed order (the dataset's, but for
    `web_dataloader` with several workers). Building reads no data.

    Shared config args: `batch_size` (global); `train` (the training split; a training pass with
    shuffling); `transform_type` (`data_loader.recipes`) and its `n_augs` views; `num_workers`
    (DataLoader workers per process); `augment_on` and `decode_on`: 'cpu' (the workers) or 'gpu'
    (the trainer, training only, `data_loader.gpu_augment`), decode_on by default augment_on.
    """

    gpu_recipe: Optional[GpuRecipe] = None

    def __init__(self, runtime: LoaderRuntime, batch_size: int, training: bool, n_augs: int):
        self.runtime = runtime
        self.global_batch_size = batch_size
        self.batch_size = per_process_batch(batch_size, runtime.world_size)
        self.training = training
        self.n_augs = n_augs
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Make the next pass epoch `epoch`'s, from batch `start_step` on. Its order and views
        depend only on (seed, epoch, rank), so a resumed epoch yields what an uninterrupted one
        would have (worker-fed loaders read and drop the batches before `start_step`)."""
        self.epoch, self.start_step = epoch, start_step

    @property
    @abc.abstractmethod
    def num_samples(self) -> int:
        """Samples in the split, all processes together."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Batches of a whole epoch on this process (`start_step` not subtracted): the same on every
        process in training; this process's own count in evaluation."""

    @abc.abstractmethod
    def check_data(self, num_classes: Optional[int] = None, key: str = "num_classes") -> None:
        """Raise DataError if the data is missing, or, with `num_classes` (the loader feeds an
        evaluator of that many classes, set at config key `key`), unlabelled or of more classes."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator:
        """The batches of the current epoch from `start_step` on."""


def check_data(loaders, evaluated=()) -> None:
    """`Loader.check_data` of each of `loaders`, and of each (loader, num_classes, key) of
    `evaluated`, before a run folder is made; dry runs skip it."""
    for loader in loaders:
        loader.check_data()
    for loader, num_classes, key in evaluated:
        loader.check_data(num_classes=num_classes, key=key)


def per_process_batch(batch_size: int, world_size: int, path: str = "batch_size") -> int:
    """The per-process batch; ConfigError when the process count does not divide the global batch."""
    if batch_size < 1 or batch_size % world_size != 0:
        raise ConfigError(f"{path}: {batch_size} (the global batch) does not divide by the {world_size} processes")
    return batch_size // world_size


def balanced_part(n: int, rank: int, world_size: int, round_up: bool = False) -> range:
    """The contiguous part of range(n) that process `rank` evaluates: from rank * n / world_size to
    (rank + 1) * n / world_size, rounded down (shards, `web_dataloader`: 5 over 2 processes are 2 + 3)
    or `round_up` (samples, the other loaders: 13 are 7 + 6). The parts cover every item once, in
    rank order, and differ in length by at most one."""
    if round_up:
        return range(-(-rank * n // world_size), -(-(rank + 1) * n // world_size))
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def train_indices(n: int, global_batch: int, epoch_gen: torch.Generator, rank: int, world_size: int,
                  shuffle: bool) -> list[torch.Tensor]:
    """This process's sample indices for each of the `n // global_batch` steps of an epoch: its slice
    of each global batch of `epoch_gen`'s permutation (or the dataset order), the same everywhere."""
    order = torch.randperm(n, generator=epoch_gen) if shuffle else torch.arange(n)
    local = global_batch // world_size
    steps = n // global_batch
    return [order[s * global_batch + rank * local: s * global_batch + (rank + 1) * local] for s in range(steps)]


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 10_007 + rank) % (2**63 - 1))


def batch_generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, step, rank): any batch can be made alone."""
    return torch.Generator().manual_seed((((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1009 + rank) % (2**63 - 1))


def loader_batches(dataset, seeds: torch.Generator, num_workers: int, cpu_recipe: bool, sampler=None) -> Iterator:
    """The batches of `dataset` (which makes whole batches) through a DataLoader of `num_workers`
    workers seeded from `seeds` (started by `start_workers`), pinned where CUDA is, as a generator.
    A `cpu_recipe` run without workers draws from `isolate_global_rngs`."""
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, generator=seeds,
                        worker_init_fn=init_worker, pin_memory=torch.cuda.is_available())
    batches = start_workers(loader)
    if cpu_recipe and num_workers == 0:
        return isolate_global_rngs(batches, seeds)
    return (batch for batch in batches)  # a generator: its close() ends the workers at once


def isolate_global_rngs(batches: Iterator, generator: torch.Generator) -> Iterator:
    """`batches`, each made with the global generators (Python, NumPy, torch) in a state of this
    pass's own, seeded from `generator` like a worker's, then restored: a recipe run in this
    process would otherwise draw alike on every process and depend on what drew before."""
    seed = int(torch.randint(2**62, (), generator=generator))
    own = None
    while True:
        outside = _global_states()
        if own is None:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.default_generator.manual_seed(seed)
        else:
            _set_global_states(own)
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            own = _global_states()
            _set_global_states(outside)
        yield batch


def _global_states() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_global_states(states: tuple) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


WORKER_IGNORED_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")  # trainer.preemption's stop signals


def _worker_signals() -> set:
    return {getattr(signal, name) for name in WORKER_IGNORED_SIGNALS if hasattr(signal, name)}  # Windows: no SIGUSR1


def start_workers(loader: DataLoader) -> Iterator:
    """`iter(loader)` with the stop signals blocked while its workers start, so that one arriving
    before `init_worker` ignores them cannot kill a worker (the trainer could then not save)."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):  # Windows has no signal masks
        return iter(loader)
    if (loader.multiprocessing_context or multiprocessing.get_context()).get_start_method() != "fork":
        # the resource tracker, started with the first worker not forked, unblocks SIGINT and SIGTERM
        multiprocessing.resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _worker_signals())
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def init_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: ignore the stop signals (the workers feed the trainer while it
    saves, trainer.preemption) and exit with `os._exit` as forked workers do: a spawned worker
    finalising while a queue thread shares a tensor aborts."""
    signums = _worker_signals()
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)  # discards those held pending since the start
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)  # blocked by `start_workers`
    atexit.register(os._exit, 0)  # registered last, so run first: before the finalisation


def end_workers_at_exit() -> None:
    """Kill the daemonic children left at exit (a loader iterator still alive): multiprocessing would
    send them SIGTERM, which the workers ignore, and wait forever."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    if hasattr(signal, "SIGCHLD"):  # not on Windows
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join()


atexit.register(end_workers_at_exit)  # registered after multiprocessing's, so run before it

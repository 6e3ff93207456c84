"""What every dataloader type shares (SPEC 5, loader semantics).

A loader is built from its config block's args plus a `LoaderRuntime` (rank, world size, seed).
It yields batches `(views, labels)`: `views` a list of `n_augs` float tensors `[b, 3, H, W]` (one per
view, in view order) and `labels` an int64 tensor `[b]`, with b = batch_size / world_size (the
config's `batch_size` is the global batch).

Training loaders (`train: true` with shuffling) drop the last partial batch and run the same number
of steps on every process; evaluation loaders yield every sample exactly once across processes,
process r holding a contiguous part of the dataset so that gathering in rank order restores the
dataset order. `set_epoch(e, start_step=i)` reshuffles and starts the next pass at batch i: the
order and the augmentations of epoch e depend only on (seed, e, rank), so a run resumed mid-epoch
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import multiprocessing
import multiprocessing.resource_tracker
import multiprocessing.util  # its exit function registered before ours, so run after it
import os
import random
import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from utils.config import ConfigError


class DataError(ConfigError):
    """The data a loader's config names is not there, cannot fill its batches, or does not fit its
    evaluator. Reported like a bad config value (one line, exit status 2); found before a run
    folder is made where the files tell (`check_data`), otherwise when the data is read."""


def check_data(loaders, evaluated=()) -> None:
    """Raise DataError if any of `loaders` would find its data missing (image folders are scanned,
    local shard files looked up), or if a loader of `evaluated` ((loader, num_classes, key)
    triples: it feeds an evaluator of num_classes classes, set at config key `key`) has images
    without classes or with more classes; dry runs skip this."""
    for loader in loaders:
        loader.check_data()
    for loader, num_classes, key in evaluated:
        loader.check_data(num_classes=num_classes, key=key)


@dataclasses.dataclass(frozen=True)
class LoaderRuntime:
    """The program's part of a loader's arguments."""

    rank: int = 0
    world_size: int = 1
    seed: int = 0


def per_process_batch(batch_size: int, world_size: int, path: str = "batch_size") -> int:
    """The per-process batch; a global batch that the process count does not divide is an error."""
    if batch_size < 1 or batch_size % world_size != 0:
        raise ConfigError(f"{path}: {batch_size} (the global batch) does not divide by the {world_size} processes")
    return batch_size // world_size


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 10_007 + rank) % (2**63 - 1))


def batch_generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for one batch, depending only on (seed, epoch, step, rank), so that any batch
    can be produced without producing the ones before it."""
    return torch.Generator().manual_seed((((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1009 + rank) % (2**63 - 1))


def own_randomness(batches: Iterator, generator: torch.Generator, in_process: bool) -> Iterator:
    """`batches` (a DataLoader's iterator) with randomness of their own when their CPU recipe runs
    `in_process` (no workers).

    Workers draw from their own generators, which the DataLoader seeds from `generator`. Without
    workers the recipe runs in this process and draws from its global generators (Python, NumPy,
    torch's CPU one), which every process seeds alike and a resume restores. So while a batch is
    made, those are swapped for the pass's own, seeded from `generator` like a worker's, and put
    back afterwards: the views depend on (seed, epoch, rank) alone (a resumed epoch, which reads
    and drops its earlier batches, repeats them exactly; processes draw different crops), and the
    process's own generators are left as they were. Loaders whose files are augmented on the GPU
    draw nothing here, and are read on the prefetching thread: they pass `in_process` false.
    """
    if not in_process:
        yield from batches
        return
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


def loader_batches(dataset, seeds: torch.Generator, num_workers: int, in_process: bool, sampler=None) -> Iterator:
    """The batches of `dataset` (which makes whole batches) through a DataLoader of `num_workers`
    workers seeded from `seeds`, as every loader type reads its data: the workers ignore the stop
    signals from their start (`start_workers`, `init_worker`) and end cleanly; batches are pinned
    where CUDA is (they copy to the GPU asynchronously); and the recipe draws from randomness of
    its own when it runs `in_process` (`own_randomness`)."""
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, generator=seeds,
                        worker_init_fn=init_worker, pin_memory=torch.cuda.is_available())
    return own_randomness(start_workers(loader), seeds, in_process)


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
    """`iter(loader)`, its worker processes started with the stop signals blocked: they inherit
    the mask and hold any such signal pending until `init_worker` has set them to be ignored. A
    stop signal in the moment a worker starts (a forked one within milliseconds; a spawned one
    imports torch first) would otherwise kill it, and the training process could not save. The
    calling thread gets the signals it held back as soon as the workers are started."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):  # Windows has no signal masks
        return iter(loader)
    if (loader.multiprocessing_context or multiprocessing.get_context()).get_start_method() != "fork":
        # multiprocessing starts its resource tracker with the first worker not forked, and
        # unblocks SIGINT and SIGTERM after it, whatever the mask was: start it first
        multiprocessing.resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _worker_signals())
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def init_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`.

    - The stop signals reach the loader's worker processes too (a terminal's Ctrl-C, SLURM's
      SIGUSR1 and SIGTERM): they ignore them and keep feeding the training process, which
      finishes its step and saves (trainer.preemption). A forked worker would otherwise run a
      copy of the trainer's handler, a spawned one die. They start with the signals blocked
      (`start_workers`), which closes the moment before this. Their own process ends them when it
      stops the iterator, or kills them when it exits (`end_workers_at_exit`).
    - A worker started by spawn or forkserver (the default on macOS, and on Linux from Python
      3.14) ends as a forked one does, at once, without finalising its interpreter. The
      DataLoader stops its workers without draining their queues; a queue's thread still sharing
      a tensor while the interpreter finalises aborts the worker ("terminate called without an
      active exception", then "DataLoader worker ... is killed by signal: Aborted" at every
      epoch's end). A forked worker never gets here: multiprocessing ends it with `os._exit`.
    """
    signums = _worker_signals()
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)  # discards those held pending since the start
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)  # blocked by `start_workers`
    atexit.register(os._exit, 0)  # registered last, so run first: before the finalisation


def end_workers_at_exit() -> None:
    """Registered with atexit in every process that imports this module, so run before
    multiprocessing's own exit function.

    A process that exits while a loader's iterator is alive (a crash mid-epoch, whose traceback
    holds it; an iterator kept in a variable) leaves the loader's workers to multiprocessing,
    which sends its daemonic children SIGTERM and waits for them. Ours ignore SIGTERM
    (`init_worker`), so the process would wait forever: the daemonic children still alive are
    killed instead (multiprocessing has no other way to tell a DataLoader's workers; a daemonic
    child gets no clean exit either way). The DataLoader's check for workers killed by a signal
    (its SIGCHLD handler) is switched off first: nothing needs it at exit.
    """
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    if hasattr(signal, "SIGCHLD"):  # not on Windows
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join()


atexit.register(end_workers_at_exit)


def eval_shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous part of n evaluation samples that process `rank` handles (all n are covered
    exactly once; later processes may hold one fewer)."""
    per = math.ceil(n / world_size)
    return range(min(rank * per, n), min((rank + 1) * per, n))


def train_indices(n: int, global_batch: int, epoch_gen: torch.Generator, rank: int, world_size: int,
                  shuffle: bool) -> list[torch.Tensor]:
    """The local sample indices of every training step of one epoch: the same global permutation
    on every process, `n // global_batch` full steps, each process its slice of each global batch."""
    order = torch.randperm(n, generator=epoch_gen) if shuffle else torch.arange(n)
    local = global_batch // world_size
    steps = n // global_batch
    return [order[s * global_batch + rank * local: s * global_batch + (rank + 1) * local] for s in range(steps)]

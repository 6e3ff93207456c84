"""Prepare the next batch (`augment_on: gpu`) on a thread with its own CUDA stream while the
current one trains: GPU decoding and augmentation take a sizeable part of a step (bench/RESULTS.md).
Results come in order and equal `prepare` run in the main thread; nothing here draws random numbers.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in nested lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class Prefetcher:
    """Iterate `prepare(item, index)` (index from 0) over `source` (read on the thread too), at most
    `depth` results ahead, on `device`. On CUDA the consumer's stream waits for each result, whose
    tensors are recorded on it (their memory is not reused early). An exception in `source` or
    `prepare` is raised in the consumer at its item. Use as a context manager or `close()` it: an
    early stop (a preempted epoch) must end the thread."""

    def __init__(self, source: Iterable, prepare: Callable[[Any, int], Any], device: torch.device, depth: int = 1):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.device = torch.device(device)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._thread = threading.Thread(target=self._work, args=(iter(source), prepare), daemon=True,
                                        name="groco-prefetch")
        self._thread.start()

    def _put(self, value: Any) -> bool:
        """Queue `value` unless stopped; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, items: Iterator, prepare: Callable[[Any, int], Any]) -> None:
        if self._cuda:  # a new thread starts on device 0, whatever the process's local rank
            torch.cuda.set_device(self.device)
        stream = torch.cuda.Stream(self.device) if self._cuda else None
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        index = 0
        try:
            with context:
                for item in items:
                    if self._stop.is_set():
                        return
                    result = prepare(item, index)
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not self._put((result, event)):
                        return
                    index += 1
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failure(error))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            value = self._queue.get()
            if value is _END:
                return
            if isinstance(value, _Failure):
                raise value.error
            result, event = value
            if event is not None:
                consumer = torch.cuda.current_stream(self.device)
                consumer.wait_event(event)
                for tensor in _tensors(result):
                    if tensor.is_cuda:
                        tensor.record_stream(consumer)
            yield result

    def close(self) -> None:
        """Stop the thread (it ends after the item it is preparing) and drop what is queued."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Optional[BaseException]) -> None:
        self.close()

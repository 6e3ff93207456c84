"""data_loader.prefetch: the next batch prepared on a thread comes out in order, equal to the
serial computation; errors reach the consumer; stopping early ends the thread."""

import itertools
import threading

import pytest
import torch

from data_loader.prefetch import Prefetcher


def prepare(item: int, index: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(item)
    x = torch.randn(64, 64, generator=gen)
    return [x @ x.T + index, torch.tensor([item, index])]


@pytest.mark.parametrize("depth", [1, 3])
def test_results_in_order_and_equal_to_serial(depth):
    items = list(range(10, 30))
    with Prefetcher(items, prepare, torch.device("cpu"), depth=depth) as batches:
        results = list(batches)
    assert len(results) == len(items)
    for index, (item, result) in enumerate(zip(items, results)):
        expected = prepare(item, index)
        assert all(torch.equal(a, b) for a, b in zip(result, expected))


def test_error_in_prepare_reaches_the_consumer_at_its_item():
    def failing(item, index):
        if index == 3:
            raise ValueError(f"bad item {item}")
        return item

    seen = []
    with pytest.raises(ValueError, match="bad item 13"):
        with Prefetcher(range(10, 20), failing, torch.device("cpu")) as batches:
            for value in batches:
                seen.append(value)
    assert seen == [10, 11, 12]


def test_error_in_the_source_reaches_the_consumer():
    def source():
        yield 1
        raise OSError("shard unreadable")

    with pytest.raises(OSError, match="shard unreadable"):
        with Prefetcher(source(), lambda item, index: item, torch.device("cpu")) as batches:
            list(batches)


def test_stopping_early_ends_the_thread():
    before = threading.active_count()
    with Prefetcher(itertools.count(), lambda item, index: item * 2, torch.device("cpu"), depth=2) as batches:
        taken = list(itertools.islice(batches, 5))
    assert taken == [0, 2, 4, 6, 8]
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="depth must be at least 1, got 0"):
        Prefetcher([], prepare, torch.device("cpu"), depth=0)

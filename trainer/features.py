"""Encoder features of a whole evaluation loader, gathered from all processes in dataset order:
evaluation loaders give process r a contiguous part of the dataset, so rank order is dataset
order. The gather moves blocks of rows, so no GPU ever holds the whole bank twice.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_loader.base import DataError
from utils.dist import any_process, gather, get_rank, get_world_size

GATHER_ROWS = 65_536  # rows per all_gather: 256 MB per process for 2048-d float16 features


def comm_device(x: torch.Tensor) -> torch.device:
    """The device a collective on `x` must use: NCCL only moves CUDA tensors, gloo either kind."""
    if x.device.type == "cpu" and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def gather_in_order(x: torch.Tensor, out_device: Optional[torch.device] = None,
                    block_rows: int = GATHER_ROWS) -> torch.Tensor:
    """Every process's rows `x` `[n_r, ...]` (n_r may differ) concatenated in rank order: `[sum_r
    n_r, ...]`, x's dtype, on `out_device` (default x's), on every process. Each collective sends
    `block_rows` rows per process: world_size * block_rows rows of extra memory at most."""
    out_device = torch.device(out_device) if out_device is not None else x.device
    world = get_world_size()
    if world == 1:
        return x.to(out_device)
    comm = comm_device(x)
    counts = gather(torch.tensor([x.shape[0]], device=comm)).tolist()
    out = torch.empty((sum(counts), *x.shape[1:]), dtype=x.dtype, device=out_device)
    offsets = [sum(counts[:r]) for r in range(world)]
    longest = max(counts)
    for start in range(0, longest, block_rows):
        rows = min(block_rows, longest - start)
        block = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=comm)
        mine = x[start: start + rows]
        block[: mine.shape[0]] = mine.to(comm)
        for r, part in enumerate(gather(block).split(rows)):
            keep = max(0, min(rows, counts[r] - start))
            out[offsets[r] + start: offsets[r] + start + keep] = part[:keep].to(out_device)
    return out


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: Iterable,
    device: torch.device,
    autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    max_samples: Optional[int] = None,
    normalize: bool = True,
    desc: str = "features",
    progress: bool = True,
    store_device: Optional[torch.device] = None,
    store_dtype: torch.dtype = torch.float32,
    gather_all: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the first view of every `(views, labels)` batch, in the loader's order, with the
    encoder (`[B, 3, H, W] -> [B, F]`) in eval mode meanwhile.

    Args:
        autocast: makes the forward pass's mixed-precision context (None: float32).
        max_samples: stop after this many samples over all processes (the first ones in rank order).
        normalize: L2-normalise the features (in float32, before any cast).
        store_device, store_dtype: where and how the features are kept (default: `device`, float32).
        gather_all: every process's features in rank order (true), or this process's only.

    Returns:
        features `[N, F]` (`store_dtype`, on `store_device`) and labels `[N]` (int64, same device).
    """
    store_device = torch.device(store_device) if store_device is not None else device
    was_training = encoder.training
    encoder.eval()
    feats, labels, seen = [], [], 0
    world = get_world_size()
    try:
        bar = tqdm(loader, desc=desc, leave=False, disable=not progress or get_rank() != 0, dynamic_ncols=True)
        for views, target in bar:
            with autocast() if autocast else contextlib.nullcontext():
                f = encoder(views[0].to(device, non_blocking=True))
            f = F.normalize(f.float(), dim=1) if normalize else f.float()
            feats.append(f.to(store_device, store_dtype))
            labels.append(target.to(store_device))
            seen += target.shape[0] * world
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        encoder.train(was_training)
    dim = getattr(encoder, "feature_dim", 0)
    local_f = torch.cat(feats) if feats else torch.zeros(0, dim, dtype=store_dtype, device=store_device)
    local_l = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=store_device)
    if not gather_all:
        return local_f, local_l
    all_f, all_l = gather_in_order(local_f), gather_in_order(local_l)
    if max_samples is not None:
        all_f, all_l = all_f[:max_samples], all_l[:max_samples]
    return all_f, all_l


def check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """DataError on every process when any process's `labels` leave [0, num_classes) (unlabelled
    images have -1), rather than wrong counts, a CUDA assert or a hang. A collective."""
    span = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
    if any_process(span[0] < 0 or span[1] >= num_classes):
        raise DataError(f"{what}: labels outside [0, {num_classes}) (num_classes {num_classes}); this process's "
                        f"span [{span[0]}, {span[1]}]; images without classes have label -1")

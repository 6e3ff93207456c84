"""Feature extraction for evaluation (SPEC 6): encoder features of a whole loader, computed once,
and gathered from all processes in dataset order.

Evaluation loaders give process r a contiguous part of the dataset (data_loader.base), so
concatenating the processes' features in rank order restores the dataset order. The features can
be kept where and as the caller says (a k-NN bank of all ImageNet is 1.28M x 2048: 5.2 GB in
float16 on a GPU, or in host memory), and the gather moves them in blocks of rows, so that no
process ever needs the whole bank twice on the GPU.
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
    """Concatenate `[n_r, ...]` from every process in rank order; n_r may differ by process.

    Args:
        x: this process's rows `[n_r, ...]`.
        out_device: where the result is kept (default: x's device).
        block_rows: rows each process sends per collective; peak extra memory on the
            communication device is world_size * block_rows rows.

    Returns:
        `[sum_r n_r, ...]` on `out_device`, x's dtype, on every process.
    """
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
    """Encoder features of the first view of every batch, in the loader's order.

    Args:
        encoder: `[B, 3, H, W] -> [B, F]`; put in eval mode here (and restored after).
        loader: yields `(views, labels)`.
        device: where the encoder runs.
        autocast: makes the mixed-precision context of the forward pass (None: float32).
        max_samples: stop once this many samples (over all processes) are collected; the result
            is the first `max_samples` in rank order.
        normalize: L2-normalise the features (in float32, before any cast).
        progress: show a progress bar (on rank 0 only).
        store_device: where the features are kept (default: `device`).
        store_dtype: their dtype (float16 halves a GPU bank).
        gather_all: gather every process's features in rank order (true), or return this
            process's part only.

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
    images have -1): an evaluator would count them wrong, or fail inside cross-entropy (a device
    assert on CUDA), or leave the other processes waiting in a collective. A collective itself."""
    span = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
    if any_process(span[0] < 0 or span[1] >= num_classes):
        raise DataError(f"{what}: labels outside [0, {num_classes}) (num_classes {num_classes}); this process's "
                        f"span [{span[0]}, {span[1]}]; images without classes have label -1")

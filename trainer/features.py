"""Feature extraction for evaluation (SPEC 6): encoder features of a whole loader, once, gathered
from all processes in dataset order."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from utils.dist import gather, get_world_size


def gather_in_order(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `[n_r, ...]` from every process in rank order; n_r may differ by process."""
    if get_world_size() == 1:
        return x
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = gather(count).tolist()
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = gather(padded).split(max(counts))
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features of the first view of every batch.

    Args:
        encoder: `[B, 3, H, W] -> [B, F]`; put in eval mode here (and restored after).
        loader: yields `(views, labels)`.
        device: where the encoder runs.
        autocast: makes the mixed-precision context of the forward pass (None: float32).
        max_samples: stop once this many samples (over all processes) are collected.
        normalize: L2-normalise the features.

    Returns:
        features `[N, F]` (float32, on `device`) and labels `[N]`, from all processes in rank order.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels, seen = [], [], 0
    world = get_world_size()
    try:
        for views, target in tqdm(loader, desc=desc, leave=False, disable=not progress):
            with autocast() if autocast else contextlib.nullcontext():
                f = encoder(views[0].to(device, non_blocking=True))
            f = f.float()
            feats.append(F.normalize(f, dim=1) if normalize else f)
            labels.append(target.to(device, non_blocking=True))
            seen += target.shape[0] * world
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        encoder.train(was_training)
    dim = getattr(encoder, "feature_dim", 0)
    local_f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    local_l = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    all_f, all_l = gather_in_order(local_f), gather_in_order(local_l)
    if max_samples is not None:
        all_f, all_l = all_f[:max_samples], all_l[:max_samples]
    return all_f, all_l

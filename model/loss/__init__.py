"""Self-supervised losses: GroCo and the SimCLR baselines (docs/reference.md §1, §2), registered
under the config names. Built with the config's arguments plus `distributed`; called as
`loss, info = loss_fn(embeddings)` with V projections `[B, D]` (global views first). `info` holds
detached 0-dim tensors (no GPU sync); all arithmetic is float32, outside autocast.
"""

from __future__ import annotations

from torch import nn

from model.loss.groco import GroCo, groco_loss
from model.loss.ntxent import NTXent, NTXentAllCombinations, NTXentWithMoreNegatives
from utils.config import ConfigError

__all__ = [
    "GroCo",
    "NTXent",
    "NTXentAllCombinations",
    "NTXentWithMoreNegatives",
    "NT_Xent",
    "NT_XentAllCombinations",
    "NT_XentWithMoreNegatives",
    "check_batches",
    "groco_loss",
]


def check_batches(loss: nn.Module, views: int, global_batch: int) -> None:
    """ConfigError, before training, when `views` is not the loss's `n_augs` (or below 2) or
    `global_batch` leaves an anchor fewer than `topk_neg` negatives (GroCo: the other samples of
    its view; NT_Xent: both views of the other samples)."""
    expected = getattr(loss, "n_augs", None)
    if expected is not None and views != expected:
        raise ConfigError(f"loss.args.n_augs: the loss takes {expected} views, but the training loader makes "
                          f"{views} (train_dataloader.args.n_augs)")
    if views < 2:
        raise ConfigError(f"train_dataloader.args.n_augs: the loss needs at least 2 views, got {views}")
    if isinstance(loss, GroCo) and global_batch - 1 < loss.topk_neg:
        raise ConfigError(f"loss.args.topk_neg: {loss.topk_neg} negatives per anchor need a global batch of at least "
                          f"{loss.topk_neg + 1} (train_dataloader.args.batch_size), got {global_batch}")
    negatives = 2 * (global_batch - 1)  # NT_Xent: both views of every other sample
    if isinstance(loss, NTXent) and loss.topk_neg is not None and not 1 <= loss.topk_neg <= negatives:
        raise ConfigError(f"loss.args.topk_neg: {loss.topk_neg}, but a global batch of {global_batch} gives an anchor "
                          f"{negatives} negatives (train_dataloader.args.batch_size)")


# The reference code's names, importable as `from model.loss import NT_Xent, ...`.
NT_Xent = NTXent
NT_XentWithMoreNegatives = NTXentWithMoreNegatives
NT_XentAllCombinations = NTXentAllCombinations

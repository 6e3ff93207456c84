"""Self-supervised losses: GroCo (SPEC 1) and the SimCLR baselines of the paper (SPEC 2).

Every loss is built with the config's keyword arguments plus `distributed` and called as
`loss, info = loss_fn(embeddings)`, with `embeddings` the list of V projections `[B, D]` in view
order (global views first). `info` holds 0-dim detached tensors; nothing here syncs the GPU.
All arithmetic is float32, outside autocast.

Importing this package registers the losses under the config names. The modules:
`groco` (GroCo), `ntxent` (the NT-Xent baselines), `ops` (the autograd functions and tensor helpers
under them); `check_batches` is here.
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
    """ConfigError, before training starts, when the training loader's batches do not fit `loss`:
    `views` other than the loss's `n_augs` (NT_Xent: fewer than 2), or a `global_batch` that
    leaves an anchor fewer than `topk_neg` negatives (GroCo: the other samples of its view;
    NT_Xent: both views of the other samples)."""
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

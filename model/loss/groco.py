"""GroCo, Group Ordering Constraints (docs/reference.md §1; the paper's Fig. 2): each anchor's K
hardest negatives and its positives go through the relaxed sorting network, and a BCE asks it to
rank every negative below every positive."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from model.loss.ops import _cpu_eager, _float32, _gather, _SelectedSimilarity, normalize, symmetric_products
from model.sorting import relaxed_rank_mass
from utils.config import ConfigError
from utils.dist import get_rank
from utils.registry import LOSSES


def hardest_negatives(anchor: torch.Tensor, candidates: torch.Tensor, offset: int, k: int) -> torch.Tensor:
    """`[V, B, k]` ascending similarities of each anchor to its k nearest candidates (ValueError when
    N - 1 < k); `anchor` `[V, B, D]`, `candidates` `[V, N, D]` L2-normalised, candidate `offset + b`
    being anchor b itself. Computed without gradient; the gradient flows through the k selected
    pairs only (as top-k over a differentiable matrix would, at a fraction of the backward cost)."""
    if candidates.shape[1] - 1 < k:
        raise ValueError(f"topk_neg={k} needs a global batch of at least {k + 1}, got {candidates.shape[1]}")
    with torch.no_grad():
        if _cpu_eager(anchor):  # one product per view: faster there
            same = (candidates.shape == anchor.shape and candidates.data_ptr() == anchor.data_ptr()
                    and anchor.shape[1] >= 512)  # smaller blocks gain nothing
            sim = torch.stack([symmetric_products(a) if same else a @ c.T for a, c in zip(anchor, candidates)])
        else:
            sim = torch.bmm(anchor, candidates.transpose(1, 2))  # [V, B, N]
        # anchor b is candidate offset + b: a diagonal. `fill_` passes -inf as a kernel argument;
        # assigning through index tensors would copy it to the device (a host sync)
        sim.diagonal(offset, dim1=1, dim2=2).fill_(-float("inf"))
        values, index = sim.topk(k, dim=2)
    if candidates is anchor:  # no stop-grad, one process: torch.compile cannot trace one tensor given twice
        candidates = anchor.view_as(anchor)
    return _SelectedSimilarity.apply(anchor, candidates, index.flip(2), values.flip(2))


def binary_cross_entropy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE with the logs clamped at -100, as `torch.nn.BCELoss`, but a NaN prediction gives a
    NaN loss (which stops training cleanly) instead of torch's range check, a device assert on CUDA."""
    log_p = pred.log().clamp_min(-100)
    log_not_p = (1 - pred).log().clamp_min(-100)
    return -(target * log_p + (1 - target) * log_not_p).mean()


def positive_similarities(z: torch.Tensor, n_pos: int, stop_grad: bool) -> list[torch.Tensor]:
    """Ascending positive similarities of `z` `[V, B, D]` (L2-normalised, the P = `n_pos` global
    views first): `[P, B, P-1]` for the global anchors, then `[V-P, B, P]` for the local ones
    (absent when V = P). `stop_grad` detaches the positives."""
    positives = z[:n_pos].detach() if stop_grad else z[:n_pos]
    cos = torch.bmm(z.transpose(0, 1), positives.permute(1, 2, 0)).transpose(0, 1)  # [V, B, P]
    # a global view is not its own positive: +inf sorts it last, where it is cut off
    own = torch.eye(n_pos, dtype=torch.bool, device=z.device).unsqueeze(1)  # [P, 1, P]
    groups = [cos[:n_pos].masked_fill(own, float("inf")).sort(dim=2).values[:, :, :-1]]
    if z.shape[0] > n_pos:
        groups.append(cos[n_pos:].sort(dim=2).values)
    return groups


def groco_group_loss(neg: torch.Tensor, pos: torch.Tensor, topk_neg: int, steepness: float) -> torch.Tensor:
    """0-dim sorting loss (docs/reference.md §1, steps 5-7), mean over A anchor views with as many
    positives; `neg` `[A, B, K]` and `pos` `[A, B, P']` ascending."""
    scores = torch.cat((neg, pos), dim=2).flatten(0, 1)  # [A*B, n]
    # Target: the identity order, every negative ranked below every positive.
    below, above = relaxed_rank_mass(scores, topk_neg, steepness)  # [A*B, n] each
    pred_neg, pred_pos = below.clamp(0, 1), above.clamp(0, 1)
    target_pos = (torch.arange(scores.shape[1], device=scores.device) >= topk_neg).float().expand_as(pred_pos)
    return (binary_cross_entropy(pred_pos, target_pos) + binary_cross_entropy(pred_neg, 1 - target_pos)) / 2


@LOSSES.register("GroCo")
class GroCo(nn.Module):
    """GroCo (docs/reference.md §1): V = `n_augs` views, the first P = `n_pos_augs` (default V)
    global, K = `topk_neg` negatives, sorting `steepness` s; `stop_grad` detaches positives and
    negatives; `distributed` (given by the program) takes negatives from the global batch.
    ConfigError unless 2 <= P <= V and K >= 1. All anchors share one similarity product, one top-k
    and one sorting network per group of anchors, so the kernel count does not grow with V."""

    def __init__(
        self,
        distributed: bool = False,
        n_augs: int = 2,
        n_pos_augs: Optional[int] = None,
        topk_neg: int = 10,
        steepness: float = 1.0,
        stop_grad: bool = True,
    ):
        super().__init__()
        n_pos_augs = n_augs if n_pos_augs is None else n_pos_augs
        if not 2 <= n_pos_augs <= n_augs:
            raise ConfigError(f"loss.args: need 2 <= n_pos_augs <= n_augs, got n_pos_augs={n_pos_augs}, "
                              f"n_augs={n_augs}")
        if topk_neg < 1:
            raise ConfigError(f"loss.args.topk_neg must be at least 1, got {topk_neg}")
        self.distributed = distributed
        self.n_augs = n_augs
        self.n_pos_augs = n_pos_augs
        self.topk_neg = topk_neg
        self.steepness = steepness
        self.stop_grad = stop_grad

    def forward(self, embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`embeddings`: V tensors `[B, D]` -> (loss, similarity statistics of the first view as anchor)."""
        with torch.autocast(embeddings[0].device.type, enabled=False):
            z = torch.stack(_float32(embeddings, self.n_augs, "GroCo"))
            return groco_loss(z, self.n_pos_augs, self.topk_neg, self.steepness, self.stop_grad, self.distributed)


def groco_loss(z: torch.Tensor, n_pos: int, topk_neg: int, steepness: float, stop_grad: bool,
               distributed: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GroCo on float32 `z` `[V, B, D]` (`n_pos` = P) -> (0-dim loss, first anchor's statistics)."""
    z = normalize(z)  # [V, B, D]
    if distributed:  # every view of the global batch, [V, W*B, D], rank-major within a view
        candidates = _gather(z.transpose(0, 1), True, detach=stop_grad).transpose(0, 1)
    else:
        candidates = z.detach() if stop_grad else z
    offset = get_rank() * z.shape[1] if distributed else 0
    neg = hardest_negatives(z, candidates, offset, topk_neg)  # [V, B, K]
    groups = positive_similarities(z, n_pos, stop_grad)  # global anchors, local anchors
    first = 0
    total = 0.0
    for pos in groups:
        count = pos.shape[0]
        total = total + count * groco_group_loss(neg[first : first + count], pos, topk_neg, steepness)
        first += count
    with torch.no_grad():
        pos0, neg0 = groups[0][0], neg[0]
        info = {
            "info_pos_max": pos0[:, -1].mean(),
            "info_pos_min": pos0[:, 0].mean(),
            "info_neg_max": neg0[:, -1].mean(),
            "info_neg_min": neg0[:, 0].mean(),
        }
        info["info_pos_neg_dist"] = info["info_pos_min"] - info["info_neg_max"]
    return total / z.shape[0], info

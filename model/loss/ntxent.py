"""The NT-Xent baselines (docs/reference.md §2): SimCLR's loss and its multi-view variants."""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.loss.ops import COSINE_EPS, _float32, _gather
from utils.dist import get_rank
from utils.registry import LOSSES


def _cross_entropy_with_masks(
    anchors: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor, excluded: torch.Tensor, temperature: float,
    topk_neg: Optional[int] = None,
) -> torch.Tensor:
    """Mean NT-Xent of L2-normalised `anchors` `[M, D]` over `candidates` `[N, D]`; `positive` `[M]`
    indexes each anchor's positive, `excluded` `[M, N]` marks candidates that are neither positive
    nor negative; `topk_neg` keeps the K hardest negatives (logits [positive, K], target 0)."""
    logits = anchors @ candidates.T / temperature
    logits = logits.masked_fill(excluded, -float("inf"))
    if topk_neg is None:
        return F.cross_entropy(logits, positive)
    pos_logit = logits.gather(1, positive[:, None])
    negatives = logits.scatter(1, positive[:, None], -float("inf"))  # a number, not a tensor to copy over
    hard = negatives.topk(topk_neg, dim=1).values
    target = torch.zeros(anchors.shape[0], dtype=torch.long, device=anchors.device)
    return F.cross_entropy(torch.cat((pos_logit, hard), dim=1), target)


def _views_layout(
    z_views: list[torch.Tensor], distributed: bool, detach: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(anchors `[2B, D]`: views 1 and 2, candidates `[W*V*B, D]`: all views of all processes, offset
    of the local block); candidate `r*V*B + v*B + i` is view v of sample i on rank r."""
    z = [F.normalize(v, dim=1, eps=COSINE_EPS) for v in z_views]
    local = torch.cat(z, dim=0)
    candidates = _gather(local, distributed, detach)
    offset = get_rank() * local.shape[0] if distributed else 0
    return torch.cat(z[:2], dim=0), candidates, offset


def _more_negatives_loss(
    z_views: list[torch.Tensor], temperature: float, distributed: bool, stop_grad: bool, topk_neg: Optional[int]
) -> torch.Tensor:
    """NT-Xent of views 1 and 2 against all views, excluding the anchor's own sample's views other
    than its positive; masks follow the gathered layout of `_views_layout`."""
    n_views, batch = len(z_views), z_views[0].shape[0]
    anchors, candidates, offset = _views_layout(z_views, distributed, stop_grad)
    device = anchors.device
    sample = torch.arange(batch, device=device).repeat(2)  # [2B]
    view = torch.arange(2, device=device).repeat_interleave(batch)  # [2B]
    positive = offset + (1 - view) * batch + sample
    same_sample = offset + torch.arange(n_views, device=device)[None, :] * batch + sample[:, None]  # [2B, V]
    excluded = torch.zeros(2 * batch, candidates.shape[0], dtype=torch.bool, device=device)
    excluded.scatter_(1, same_sample, True)
    excluded.scatter_(1, positive[:, None], False)
    return _cross_entropy_with_masks(anchors, candidates, positive, excluded, temperature, topk_neg)


@LOSSES.register("NT_Xent")
class NTXent(nn.Module):
    """SimCLR's NT-Xent on views 1 and 2; `stop_grad` detaches the candidates, `topk_neg` keeps the
    K hardest negatives, `distributed` takes negatives from the global batch."""

    def __init__(self, distributed: bool = False, temperature: float = 0.5, stop_grad: bool = False,
                 topk_neg: Optional[int] = None):
        super().__init__()
        self.distributed = distributed
        self.temperature = temperature
        self.stop_grad = stop_grad
        self.topk_neg = topk_neg

    def forward(self, embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`embeddings`: at least 2 tensors `[B, D]`; only the first two are used."""
        with torch.autocast(embeddings[0].device.type, enabled=False):
            z = _float32(embeddings[:2], 2, "NT_Xent")
            loss = _more_negatives_loss(z, self.temperature, self.distributed, self.stop_grad, self.topk_neg)
        return loss, {}


@LOSSES.register("NT_XentWithMoreNegatives")
class NTXentWithMoreNegatives(nn.Module):
    """NT-Xent with views 1 and 2 as anchors and all V views of all samples as candidates."""

    def __init__(self, n_augs: int, distributed: bool = False, temperature: float = 0.5):
        super().__init__()
        self.n_augs = n_augs
        self.distributed = distributed
        self.temperature = temperature

    def forward(self, embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(embeddings[0].device.type, enabled=False):
            z = _float32(embeddings, self.n_augs, "NT_XentWithMoreNegatives")
            loss = _more_negatives_loss(z, self.temperature, self.distributed, False, None)
        return loss, {}


@LOSSES.register("NT_XentAllCombinations")
class NTXentAllCombinations(nn.Module):
    """Mean of NT_XentWithMoreNegatives over the view pairs (n, m), n <= P, n < m <= V, with n and m
    moved to the front."""

    def __init__(self, n_augs: int, distributed: bool = False, temperature: float = 0.5,
                 n_pos_augs: Optional[int] = None):
        super().__init__()
        self.n_augs = n_augs
        self.n_pos_augs = n_augs if n_pos_augs is None else n_pos_augs
        self.distributed = distributed
        self.temperature = temperature

    def pairs(self) -> list[tuple[int, int]]:
        """0-based view pairs (n, m)."""
        return [(n, m) for n, m in itertools.combinations(range(self.n_augs), 2) if n < self.n_pos_augs]

    def forward(self, embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(embeddings[0].device.type, enabled=False):
            z = _float32(embeddings, self.n_augs, "NT_XentAllCombinations")
            losses = []
            for n, m in self.pairs():
                order = [z[n], z[m]] + [v for i, v in enumerate(z) if i not in (n, m)]
                losses.append(_more_negatives_loss(order, self.temperature, self.distributed, False, None))
        return torch.stack(losses).mean(), {}

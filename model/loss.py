"""Self-supervised losses: GroCo (SPEC 1) and the SimCLR baselines of the paper (SPEC 2).

Every loss is built with the config's keyword arguments plus `distributed` and called as
`loss, info = loss_fn(embeddings)`, with `embeddings` the list of V projections `[B, D]` in view
order (global views first). `info` holds 0-dim detached tensors; nothing here syncs the GPU.
All arithmetic is float32, outside autocast.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.sorting import relaxed_rank_mass
from utils.dist import gather, gather_with_grad, get_rank
from utils.registry import LOSSES

COSINE_EPS = 1e-8


def _float32(embeddings: list[torch.Tensor], expected: int, name: str) -> list[torch.Tensor]:
    if len(embeddings) != expected:
        raise ValueError(f"{name} expects {expected} views (n_augs), got {len(embeddings)}")
    return [z.float() for z in embeddings]


def _gather(z: torch.Tensor, distributed: bool, detach: bool) -> torch.Tensor:
    """z from all processes, rank-major; the gradient reaches the local slice unless `detach`."""
    if not distributed:
        return z.detach() if detach else z
    return gather(z.detach()) if detach else gather_with_grad(z)


class _SelectedSimilarity(torch.autograd.Function):
    """`values[b, k]` = <anchor[b], candidates[index[b, k]]>, already computed without gradient; the
    backward pass multiplies by the `[B, N]` matrix that holds the K gradients of each row, instead
    of differentiating the whole similarity matrix or gathering `[B, K, D]` candidates."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, candidates: torch.Tensor, index: torch.Tensor, values: torch.Tensor):
        ctx.save_for_backward(anchor, candidates, index)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        anchor, candidates, index = ctx.saved_tensors
        weights = selected_weights(grad, index, candidates.shape[0], sparse=_use_sparse(grad))
        grad_anchor = _matmul(weights, candidates) if ctx.needs_input_grad[0] else None
        grad_candidates = _matmul(weights.t(), anchor) if ctx.needs_input_grad[1] else None
        return grad_anchor, grad_candidates, None, None


def _use_sparse(grad: torch.Tensor) -> bool:
    """Sparse products on the CPU, where the dense `[B, N] x [N, D]` products would cost as much as
    the similarities; dense on a GPU and under torch.compile, where they are one cheap kernel each
    (no index sorting, and traceable into a CUDA graph)."""
    return grad.device.type == "cpu" and not torch.compiler.is_compiling()


def selected_weights(grad: torch.Tensor, index: torch.Tensor, n_candidates: int, sparse: bool) -> torch.Tensor:
    """`[B, N]` matrix with `grad[b, k]` at column `index[b, k]` (the indices of a row are distinct)
    and zeros elsewhere; a sparse COO tensor when `sparse`."""
    if not sparse:
        return grad.new_zeros(grad.shape[0], n_candidates).scatter_(1, index, grad)
    rows = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
    return torch.sparse_coo_tensor(torch.stack((rows, index.flatten())), grad.flatten(),
                                   (index.shape[0], n_candidates), check_invariants=False)


def _matmul(weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return torch.sparse.mm(weights, dense) if weights.is_sparse else weights @ dense


def hardest_negatives(anchor: torch.Tensor, candidates: torch.Tensor, offset: int, k: int) -> torch.Tensor:
    """Cosine similarities of each anchor to its k most similar candidates, ascending.

    The similarity matrix is computed once without gradient; the gradient reaches anchors and
    candidates through the k selected pairs only, which is what top-k over a differentiable matrix
    gives, at a fraction of its backward cost.

    Args:
        anchor: `[B, D]` L2-normalised anchors.
        candidates: `[N, D]` L2-normalised candidates; row `offset + b` is anchor b itself and
            never counts as its negative.
        offset: index of the first local anchor among the candidates.
        k: number of negatives.

    Returns:
        `[B, k]` similarities in ascending order.
    """
    batch = anchor.shape[0]
    if candidates.shape[0] - 1 < k:
        raise ValueError(f"topk_neg={k} needs a global batch of at least {k + 1}, got {candidates.shape[0]}")
    with torch.no_grad():
        sim = anchor @ candidates.T  # [B, N]
        own = torch.arange(batch, device=anchor.device)
        sim[own, own + offset] = -float("inf")
        values, index = sim.topk(k, dim=1)
    if candidates is anchor:  # one view, no stop-grad: torch.compile cannot trace one tensor given twice
        candidates = anchor.view_as(anchor)
    return _SelectedSimilarity.apply(anchor, candidates, index.flip(1), values.flip(1))


def binary_cross_entropy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE with the logs clamped at -100, as `torch.nn.BCELoss`, but a NaN prediction gives a
    NaN loss (which stops training cleanly) instead of torch's range check, a device assert on CUDA."""
    log_p = pred.log().clamp_min(-100)
    log_not_p = (1 - pred).log().clamp_min(-100)
    return -(target * log_p + (1 - target) * log_not_p).mean()


def groco_anchor_loss(
    anchor: torch.Tensor,
    positives: list[torch.Tensor],
    topk_neg: int,
    steepness: float,
    stop_grad: bool,
    distributed: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GroCo loss of one anchor view (SPEC 1, steps 1-7).

    Args:
        anchor: `[B, D]` L2-normalised projections of the anchor view (float32).
        positives: the other global views, each `[B, D]` and L2-normalised.
        topk_neg: K, the number of hardest negatives sorted with the positives.
        steepness: s of the Cauchy relaxation.
        stop_grad: detach the positives and the negatives.
        distributed: take negatives from the global batch.

    Returns:
        the loss (0-dim) and similarity statistics (0-dim, detached).
    """
    # cosine similarity = dot product of the unit vectors (each normalised once per view, by the caller)
    pos = torch.stack([(anchor * (p.detach() if stop_grad else p)).sum(1) for p in positives], dim=1)  # [B, P']
    pos, _ = torch.sort(pos, dim=1)
    candidates = _gather(anchor, distributed, detach=stop_grad)
    offset = get_rank() * anchor.shape[0] if distributed else 0
    neg = hardest_negatives(anchor, candidates, offset, topk_neg)  # [B, K]

    # Target: the identity order, every negative ranked below every positive.
    below, above = relaxed_rank_mass(torch.cat((neg, pos), dim=1), topk_neg, steepness)  # [B, n] each
    pred_neg, pred_pos = below.clamp(0, 1), above.clamp(0, 1)
    n = pred_pos.shape[1]
    target_pos = (torch.arange(n, device=pred_pos.device) >= topk_neg).float().expand_as(pred_pos)
    loss = (binary_cross_entropy(pred_pos, target_pos) + binary_cross_entropy(pred_neg, 1 - target_pos)) / 2

    with torch.no_grad():
        info = {
            "info_pos_max": pos[:, -1].mean(),
            "info_pos_min": pos[:, 0].mean(),
            "info_neg_max": neg[:, -1].mean(),
            "info_neg_min": neg[:, 0].mean(),
        }
        info["info_pos_neg_dist"] = info["info_pos_min"] - info["info_neg_max"]
    return loss, info


@LOSSES.register("GroCo")
class GroCo(nn.Module):
    """Group Ordering Constraints loss (SPEC 1): the mean over anchor views of the sorting loss
    that ranks each anchor's K hardest negatives below its positives.

    Args:
        distributed: negatives from the global batch (given by the program).
        n_augs: V, the number of views.
        n_pos_augs: P, the number of global views used as positives (default V; 2 for multi-crop).
        topk_neg: K, the number of hardest negatives per anchor.
        steepness: s of the relaxed sorting network.
        stop_grad: no gradient through positives and negatives.
    """

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
        if not 1 <= n_pos_augs <= n_augs or (n_augs == 1):
            raise ValueError(f"loss.args: need 1 <= n_pos_augs <= n_augs and n_augs >= 2, got {n_pos_augs}, {n_augs}")
        if topk_neg < 1:
            raise ValueError(f"loss.args.topk_neg must be at least 1, got {topk_neg}")
        self.distributed = distributed
        self.n_augs = n_augs
        self.n_pos_augs = n_pos_augs
        self.topk_neg = topk_neg
        self.steepness = steepness
        self.stop_grad = stop_grad

    def forward(self, embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`embeddings`: V tensors `[B, D]` -> (loss, info of the first anchor)."""
        with torch.autocast(embeddings[0].device.type, enabled=False):
            z = [F.normalize(v, dim=1, eps=COSINE_EPS) for v in _float32(embeddings, self.n_augs, "GroCo")]
            total, first_info = 0.0, {}
            for a in range(self.n_augs):
                positives = [z[p] for p in range(self.n_pos_augs) if p != a]
                loss, info = groco_anchor_loss(
                    z[a], positives, self.topk_neg, self.steepness, self.stop_grad, self.distributed
                )
                total = total + loss
                first_info = first_info or info
        return total / self.n_augs, first_info


def _cross_entropy_with_masks(
    anchors: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor, excluded: torch.Tensor, temperature: float,
    topk_neg: Optional[int] = None,
) -> torch.Tensor:
    """Mean NT-Xent over anchors.

    Args:
        anchors: `[M, D]` L2-normalised.
        candidates: `[N, D]` L2-normalised.
        positive: `[M]` index of each anchor's positive among the candidates.
        excluded: `[M, N]` bool, candidates that are neither positive nor negative for the anchor.
        temperature: softmax temperature.
        topk_neg: keep only the hardest negatives (logits = [positive, K negatives], target 0).
    """
    logits = anchors @ candidates.T / temperature
    logits = logits.masked_fill(excluded, -float("inf"))
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    if topk_neg is None:
        return F.cross_entropy(logits, positive)
    pos_logit = logits[rows, positive].unsqueeze(1)
    negatives = logits.index_put((rows, positive), torch.tensor(-float("inf"), device=logits.device))
    hard = negatives.topk(topk_neg, dim=1).values
    target = torch.zeros(anchors.shape[0], dtype=torch.long, device=anchors.device)
    return F.cross_entropy(torch.cat((pos_logit, hard), dim=1), target)


def _views_layout(
    z_views: list[torch.Tensor], distributed: bool, detach: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Anchors = views 1 and 2 of the local samples; candidates = all V views of all samples.

    Returns (anchors `[2B, D]`, candidates `[W*V*B, D]`, index of the local block): candidate row
    `r*V*B + v*B + i` is view v of sample i of process r, the real gathered layout.
    """
    z = [F.normalize(v, dim=1, eps=COSINE_EPS) for v in z_views]
    local = torch.cat(z, dim=0)
    candidates = _gather(local, distributed, detach)
    offset = get_rank() * local.shape[0] if distributed else 0
    return torch.cat(z[:2], dim=0), candidates, offset


def _more_negatives_loss(
    z_views: list[torch.Tensor], temperature: float, distributed: bool, stop_grad: bool, topk_neg: Optional[int]
) -> torch.Tensor:
    """NT-Xent with views 1 and 2 as anchors against all views; the views of the anchor's own
    sample other than its positive are excluded (SPEC 2)."""
    n_views, batch = len(z_views), z_views[0].shape[0]
    anchors, candidates, offset = _views_layout(z_views, distributed, stop_grad)
    device = anchors.device
    sample = torch.arange(batch, device=device).repeat(2)  # [2B]
    view = torch.arange(2, device=device).repeat_interleave(batch)  # [2B]
    positive = offset + (1 - view) * batch + sample
    same_sample = offset + torch.arange(n_views, device=device)[None, :] * batch + sample[:, None]  # [2B, V]
    excluded = torch.zeros(2 * batch, candidates.shape[0], dtype=torch.bool, device=device)
    excluded.scatter_(1, same_sample, True)
    excluded[torch.arange(2 * batch, device=device), positive] = False
    return _cross_entropy_with_masks(anchors, candidates, positive, excluded, temperature, topk_neg)


@LOSSES.register("NT_Xent")
class NTXent(nn.Module):
    """SimCLR's NT-Xent on views 1 and 2 (SPEC 2).

    Args:
        distributed: negatives from the global batch.
        temperature: softmax temperature.
        stop_grad: no gradient through the candidates.
        topk_neg: keep only the K hardest negatives.
    """

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
    """NT-Xent with views 1 and 2 as anchors and all V views of all samples as candidates (SPEC 2)."""

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
    moved to the front (SPEC 2)."""

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


# The reference code's names, importable as `from model.loss import NT_Xent, ...`.
NT_Xent = NTXent
NT_XentWithMoreNegatives = NTXentWithMoreNegatives
NT_XentAllCombinations = NTXentAllCombinations

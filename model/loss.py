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
from utils.config import ConfigError
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


class _Normalize(torch.autograd.Function):
    """`x / max(||x||, eps)` along the last dimension (`F.normalize`), with its backward written as one
    expression, `(g - y <g, y>) / max(||x||, eps)`, instead of autograd's chain through the norm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        scale = norm.clamp_min(eps)
        y = x / scale
        ctx.save_for_backward(y, scale, norm > eps)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, scale, unclamped = ctx.saved_tensors
        along = (grad * y).sum(-1, keepdim=True) * unclamped  # a clamped norm is a constant scale
        return torch.addcmul(grad, y, along, value=-1) / scale, None


def normalize(x: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """Unit vectors along the last dimension, as `F.normalize(x, dim=-1, eps=eps)`."""
    return _Normalize.apply(x, eps)


class _SelectedSimilarity(torch.autograd.Function):
    """`values[v, b, k]` = <anchor[v, b], candidates[v, index[v, b, k]]>, already computed without
    gradient; the backward pass multiplies by the matrix that holds the K gradients of each row,
    instead of differentiating the whole similarity matrix or gathering `[V, B, K, D]` candidates."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, candidates: torch.Tensor, index: torch.Tensor, values: torch.Tensor):
        ctx.save_for_backward(anchor, candidates, index)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        anchor, candidates, index = ctx.saved_tensors
        views, batch, dim = anchor.shape
        n_candidates = candidates.shape[1]
        grad_anchor = grad_candidates = None
        if _cpu_eager(grad):  # sparse products; dense ones would cost as much as the similarities
            # the V blocks as one block-diagonal [V*B, V*N] sparse matrix
            weights = selected_weights(grad.flatten(0, 1), _block_columns(index, n_candidates),
                                       views * n_candidates, sparse=True)
            if ctx.needs_input_grad[0]:
                grad_anchor = torch.sparse.mm(weights, candidates.flatten(0, 1)).view(views, batch, dim)
            if ctx.needs_input_grad[1]:
                grad_candidates = torch.sparse.mm(weights.t(), anchor.flatten(0, 1)).view(views, n_candidates, dim)
        else:  # dense: one cheap kernel each on a GPU, no index sorting, traceable into a CUDA graph
            weights = selected_weights(grad, index, n_candidates, sparse=False)  # [V, B, N]
            if ctx.needs_input_grad[0]:
                grad_anchor = torch.bmm(weights, candidates)
            if ctx.needs_input_grad[1]:
                grad_candidates = torch.bmm(weights.transpose(1, 2), anchor)
        return grad_anchor, grad_candidates, None, None


def _cpu_eager(t: torch.Tensor) -> bool:
    """`t` is on the CPU and this runs outside torch.compile: where the CPU-only shortcuts apply
    (sparse products, per-view matrix products), which a GPU or a compiled graph does not want."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _block_columns(index: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """`[V, B, K]` column indices per block -> `[V*B, K]` columns of the block-diagonal matrix."""
    shift = torch.arange(index.shape[0], device=index.device).view(-1, 1, 1) * n_candidates
    return (index + shift).flatten(0, 1)


def selected_weights(grad: torch.Tensor, index: torch.Tensor, n_candidates: int, sparse: bool) -> torch.Tensor:
    """`[..., R, N]` matrix with `grad[..., r, k]` at column `index[..., r, k]` (the indices of a row
    are distinct) and zeros elsewhere; a sparse COO tensor (2-D only) when `sparse`."""
    if not sparse:
        return grad.new_zeros(*grad.shape[:-1], n_candidates).scatter_(-1, index, grad)
    rows = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
    return torch.sparse_coo_tensor(torch.stack((rows, index.flatten())), grad.flatten(),
                                   (index.shape[0], n_candidates), check_invariants=False)


def symmetric_products(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """`x @ x.T` for `x` `[B, D]`, computing only the row blocks on and above the diagonal and
    mirroring the others (10 of 16 block products with 4 blocks): the similarities of a view with
    itself, on the CPU, where the product is most of the loss's time."""
    parts = x.split(-(-x.shape[0] // blocks))
    starts = [0]
    for part in parts:
        starts.append(starts[-1] + len(part))
    out = x.new_empty(x.shape[0], x.shape[0])
    for i, a in enumerate(parts):
        for j in range(i, len(parts)):
            block = a @ parts[j].T
            out[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] = block
            if j != i:
                out[starts[j] : starts[j + 1], starts[i] : starts[i + 1]] = block.T
    return out


def hardest_negatives(anchor: torch.Tensor, candidates: torch.Tensor, offset: int, k: int) -> torch.Tensor:
    """Cosine similarities of each anchor to its k most similar candidates of the same view, ascending.

    The similarity matrices are computed once without gradient; the gradient reaches anchors and
    candidates through the k selected pairs only, which is what top-k over a differentiable matrix
    gives, at a fraction of its backward cost.

    Args:
        anchor: `[V, B, D]` L2-normalised anchors, one block per view.
        candidates: `[V, N, D]` L2-normalised candidates of each view; row `offset + b` is anchor b
            itself and never counts as its negative.
        offset: index of the first local anchor among the candidates.
        k: number of negatives.

    Returns:
        `[V, B, k]` similarities in ascending order.
    """
    if candidates.shape[1] - 1 < k:
        raise ValueError(f"topk_neg={k} needs a global batch of at least {k + 1}, got {candidates.shape[1]}")
    with torch.no_grad():
        if _cpu_eager(anchor):  # one product per view: faster there
            same = (candidates.shape == anchor.shape and candidates.data_ptr() == anchor.data_ptr()
                    and anchor.shape[1] >= 512)  # smaller blocks gain nothing
            sim = torch.stack([symmetric_products(a) if same else a @ c.T for a, c in zip(anchor, candidates)])
        else:
            sim = torch.bmm(anchor, candidates.transpose(1, 2))  # [V, B, N]
        # anchor b is candidate offset + b: a diagonal. `fill_` takes the number as a kernel argument;
        # assigning it through index tensors copies it to the device first, a wait on torch 2.11
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
    """Cosine similarities of every view to its positives, ascending, in two groups of anchors:
    the global views (`[P, B, P-1]`: the other global views) and the local ones (`[V-P, B, P]`:
    every global view; absent when V = P).

    Args:
        z: `[V, B, D]` L2-normalised views, the P global ones first.
        n_pos: P.
        stop_grad: detach the positives.
    """
    positives = z[:n_pos].detach() if stop_grad else z[:n_pos]
    cos = torch.bmm(z.transpose(0, 1), positives.permute(1, 2, 0)).transpose(0, 1)  # [V, B, P]
    # a global view is not its own positive: +inf sorts it last, where it is cut off
    own = torch.eye(n_pos, dtype=torch.bool, device=z.device).unsqueeze(1)  # [P, 1, P]
    groups = [cos[:n_pos].masked_fill(own, float("inf")).sort(dim=2).values[:, :, :-1]]
    if z.shape[0] > n_pos:
        groups.append(cos[n_pos:].sort(dim=2).values)
    return groups


def groco_group_loss(neg: torch.Tensor, pos: torch.Tensor, topk_neg: int, steepness: float) -> torch.Tensor:
    """GroCo's sorting loss (SPEC 1, steps 5-7) averaged over a group of anchors with as many positives.

    Args:
        neg: `[A, B, K]` hardest-negative similarities, ascending.
        pos: `[A, B, P']` positive similarities, ascending.

    Returns:
        0-dim: the mean over the A anchor views of each one's loss.
    """
    scores = torch.cat((neg, pos), dim=2).flatten(0, 1)  # [A*B, n]
    # Target: the identity order, every negative ranked below every positive.
    below, above = relaxed_rank_mass(scores, topk_neg, steepness)  # [A*B, n] each
    pred_neg, pred_pos = below.clamp(0, 1), above.clamp(0, 1)
    target_pos = (torch.arange(scores.shape[1], device=scores.device) >= topk_neg).float().expand_as(pred_pos)
    return (binary_cross_entropy(pred_pos, target_pos) + binary_cross_entropy(pred_neg, 1 - target_pos)) / 2


@LOSSES.register("GroCo")
class GroCo(nn.Module):
    """Group Ordering Constraints loss (SPEC 1): the mean over anchor views of the sorting loss
    that ranks each anchor's K hardest negatives below its positives.

    Every view is an anchor; its positives are the other global views (the first P); its negatives
    are the K most similar other samples of the same view in the (global) batch. All anchor views
    go through one similarity product, one top-k and one sorting network per group of anchors
    with as many positives, so the kernel count does not grow with V.

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
    """GroCo (SPEC 1) on stacked float32 embeddings `z` `[V, B, D]` (the `GroCo` module's arguments;
    `n_pos` = P) -> (0-dim loss, the similarity statistics of the first view as anchor)."""
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
    excluded.scatter_(1, positive[:, None], False)
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

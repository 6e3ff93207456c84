"""Tensor operations under the losses: custom autograd functions that make GroCo cheaper, and the
helpers both loss families share (cosine eps, float32 cast, gather across processes)."""

from __future__ import annotations

import torch

from utils.dist import gather, gather_with_grad

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
    """`x / max(||x||, eps)` on the last dimension, backward in one expression:
    `(g - y <g, y>) / max(||x||, eps)`."""

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
    """`values[v, b, k]` = <anchor[v, b], candidates[v, index[v, b, k]]>, computed without gradient;
    the backward multiplies by the matrix holding each row's K gradients (sparse on the CPU)."""

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
    """`t` is on the CPU outside torch.compile: where the CPU-only shortcuts (sparse and per-view
    products) pay."""
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
    """`x @ x.T` for `x` `[B, D]` from the blocks on and above the diagonal, mirrored (10 of 16
    products with 4 blocks); on the CPU this product is most of the loss's time."""
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

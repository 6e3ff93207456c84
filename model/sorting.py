"""The relaxed odd-even transposition sorting network (SPEC 1; Petersen et al., ICML 2021).

Computes what `diffsort.DiffSortNet('odd_even', n, steepness=s, distribution='cauchy')` computes,
with one gather per layer instead of diffsort's dense 0/1 matrix products: on n inputs there are n
layers; layer l compares the neighbours (i, i+1) for i = l % 2, l % 2 + 2, ...; every comparator
(a, b) is relaxed with the Cauchy CDF alpha = atan(s * (b - a)) / pi + 1/2 and outputs
(alpha a + (1 - alpha) b, (1 - alpha) a + alpha b).

Written per wire: with p(i) the wire compared with i (i itself when unpaired) and d = x[p(i)] - x[i],
both outputs of a comparator are x[i] + (1 - alpha) d, and 1 - alpha = 1/2 + atan(s * sign(i) * d) / pi
with sign -1 on the lower wire and +1 on the upper one (0 on an unpaired wire, whose d is 0). A layer is
then a handful of full-width element-wise kernels, which keeps the GPU's launch count low.
"""

from __future__ import annotations

import math

import torch


def odd_even_wiring(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's wiring, computed on `device` from index arithmetic: `partner` `[n, n]` long (the wire
    each wire of layer l is compared with, itself when unpaired) and `sign` `[n, n]` of `dtype` (-1 on
    the lower wire of a comparator, +1 on the upper one, 0 unpaired). Layer l pairs (i, i + 1) for
    i = l % 2, l % 2 + 2, ... while i + 1 < n."""
    wire = torch.arange(n, device=device)
    from_first = wire[None, :] - (wire % 2)[:, None]  # [layer, wire]: i - l % 2
    lower = (from_first >= 0) & (from_first % 2 == 0) & (wire[None, :] + 1 < n)
    upper = (from_first >= 1) & (from_first % 2 == 1)
    partner = wire[None, :] + lower.long() - upper.long()
    return partner, upper.to(dtype) - lower.to(dtype)


class _SwapWires(torch.autograd.Function):
    """`u[..., partner]` for a layer's `partner` `[n]`, which is its own inverse (a wire's partner's
    partner is the wire), so the backward is the same gather, not autograd's scatter-add: one
    kernel instead of two, and torch 2.11's inductor compiled the scatter-adds of four or more
    layers into wrong gradients (seen on the CPU; 2.14 compiles them right)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, partner: torch.Tensor):
        ctx.save_for_backward(partner)
        return u[..., partner]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (partner,) = ctx.saved_tensors
        return grad[..., partner], None


def swap_wires(u: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """`u[..., partner]`: each wire takes the value of the wire it is compared with in the layer."""
    return _SwapWires.apply(u, partner)


_WIRING_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def wiring(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`odd_even_wiring`, made once per (n, device, dtype) in eager mode. Under torch.compile it is
    traced as a few device kernels (which inductor may fold into constants): a wiring built on the
    CPU would be a host computation and a blocking copy inside the graph, which also keeps CUDA
    graphs from capturing it."""
    if torch.compiler.is_compiling():
        return odd_even_wiring(n, device, dtype)
    key = (n, torch.device(device), dtype)
    if key not in _WIRING_CACHE:
        _WIRING_CACHE[key] = odd_even_wiring(n, device, dtype)
    return _WIRING_CACHE[key]


def _layers(scores: torch.Tensor, steepness: float):
    """Run the network on `scores` `[B, n]`; yields (partner `[n]`, mixing weight `[B, n]`, output `[B, n]`)
    per layer, where the layer maps any `u` to `u + weight * (swap_wires(u, partner) - u)`."""
    partner, sign = wiring(scores.shape[1], scores.device, scores.dtype)
    slope = sign * steepness  # [n_layers, n]
    x = scores
    for layer in range(partner.shape[0]):
        d = swap_wires(x, partner[layer]) - x
        turn = torch.atan(d * slope[layer])
        weight = turn.mul(1 / math.pi).add_(0.5)  # 1 - alpha of the wire's comparator
        x = torch.addcmul(x, weight, d)
        yield partner[layer], weight, x


def relaxed_rank_mass(scores: torch.Tensor, split: int, steepness: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For each input, the relaxed probability of ending below / at or above rank `split`:
    `perm[:, :, :split].sum(2)` and `perm[:, :, split:].sum(2)` of the network's relaxed permutation
    matrix (`perm[b, i, j]` the probability that input i ends at rank j), without the `[B, n, n]`
    matrix.

    Every layer mixes the permutation matrix's columns pairwise with a symmetric matrix M_l, so
    perm = M_1 ... M_L and perm @ m = M_1 (... (M_L m)): the column sums are two vectors pushed
    back through the layers, O(n) per layer instead of O(n^2). Both are computed (rather than one
    as 1 minus the other) so that a mass near 0 keeps its relative precision for the log of the BCE.

    Args:
        scores: `[B, n]` values to sort.
        split: the rank that separates the two groups.

    Returns:
        below, above: `[B, n]` each.
    """
    batch, n = scores.shape
    layers = [(partner, weight.unsqueeze(1)) for partner, weight, _ in _layers(scores, steepness)]
    above = (torch.arange(n, device=scores.device) >= split).to(scores.dtype)
    mass = torch.stack((1 - above, above)).expand(batch, 2, n)  # [B, 2, n]: below, above
    for partner, weight in reversed(layers):
        mass = torch.addcmul(mass, weight, swap_wires(mass, partner) - mass)
    return mass[:, 0], mass[:, 1]

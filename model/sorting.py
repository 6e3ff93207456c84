"""The relaxed odd-even sorting network of `diffsort.DiffSortNet('odd_even', n, steepness=s,
distribution='cauchy')` (docs/reference.md §1), one gather per layer. Per wire i with partner p(i)
(i when unpaired) and d = x[p(i)] - x[i], the output is x[i] + (1 - alpha) d with
1 - alpha = 1/2 + atan(s * sign(i) * d) / pi (sign -1 on the lower wire, +1 upper, 0 unpaired).
"""

from __future__ import annotations

import math

import torch


def odd_even_wiring(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`partner` `[n, n]` long (layer, wire: the partner, itself when unpaired) and `sign` `[n, n]`
    (-1 lower wire, +1 upper, 0 unpaired); layer l pairs (i, i + 1) for i = l % 2, l % 2 + 2, ..."""
    wire = torch.arange(n, device=device)
    from_first = wire[None, :] - (wire % 2)[:, None]  # [layer, wire]: i - l % 2
    lower = (from_first >= 0) & (from_first % 2 == 0) & (wire[None, :] + 1 < n)
    upper = (from_first >= 1) & (from_first % 2 == 1)
    partner = wire[None, :] + lower.long() - upper.long()
    return partner, upper.to(dtype) - lower.to(dtype)


class _SwapWires(torch.autograd.Function):
    """`u[..., partner]` for a layer's `partner` `[n]`. The pairing is its own inverse, so the
    backward is the same gather rather than autograd's scatter-add (which some torch versions'
    inductor compiles into wrong gradients)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, partner: torch.Tensor):
        ctx.save_for_backward(partner)
        return u[..., partner]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (partner,) = ctx.saved_tensors
        return grad[..., partner], None


def swap_wires(u: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """`u[..., partner]`: each wire takes its partner's value."""
    return _SwapWires.apply(u, partner)


_WIRING_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def wiring(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`odd_even_wiring`, cached per (n, device, dtype) in eager mode; traced under torch.compile,
    so the graph holds device kernels rather than a host copy (which CUDA graphs cannot capture)."""
    if torch.compiler.is_compiling():
        return odd_even_wiring(n, device, dtype)
    key = (n, torch.device(device), dtype)
    if key not in _WIRING_CACHE:
        _WIRING_CACHE[key] = odd_even_wiring(n, device, dtype)
    return _WIRING_CACHE[key]


def _layers(scores: torch.Tensor, steepness: float):
    """Per layer on `scores` `[B, n]`: (partner `[n]`, weight `[B, n]`, output `[B, n]`); the layer
    maps any `u` to `u + weight * (swap_wires(u, partner) - u)`."""
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
    """(below, above), `[B, n]` each, for `scores` `[B, n]`: `perm[:, :, :split].sum(2)` and
    `perm[:, :, split:].sum(2)` of the relaxed permutation matrix, without building it.

    perm = M_1 ... M_L with symmetric per-layer mixings M_l, so perm @ m is two vectors pushed back
    through the layers, O(n) per layer. Both masses are computed (not one as 1 minus the other) so
    that a mass near 0 keeps its relative precision for the BCE's log.
    """
    batch, n = scores.shape
    layers = [(partner, weight.unsqueeze(1)) for partner, weight, _ in _layers(scores, steepness)]
    above = (torch.arange(n, device=scores.device) >= split).to(scores.dtype)
    mass = torch.stack((1 - above, above)).expand(batch, 2, n)  # [B, 2, n]: below, above
    for partner, weight in reversed(layers):
        mass = torch.addcmul(mass, weight, swap_wires(mass, partner) - mass)
    return mass[:, 0], mass[:, 1]

"""The relaxed odd-even transposition sorting network (SPEC 1; Petersen et al., ICML 2021).

Computes what `diffsort.DiffSortNet('odd_even', n, steepness=s, distribution='cauchy')` computes,
with strided index operations instead of diffsort's dense 0/1 matrix products: on n inputs there
are n layers; layer l compares the neighbours (i, i+1) for i = l % 2, l % 2 + 2, ...; every
comparator (a, b) is relaxed with the Cauchy CDF alpha = atan(s * (b - a)) / pi + 1/2.
"""

from __future__ import annotations

import math

import torch


def odd_even_layers(n: int) -> list[tuple[int, int]]:
    """For each of the n layers: (index of the first compared wire, number of comparators)."""
    return [(layer % 2, (n - layer % 2) // 2) for layer in range(n)]


def _interleave(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """`[..., m]`, `[..., m]` -> `[..., 2m]` as lo0, hi0, lo1, hi1, ..."""
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def relaxed_sort(scores: torch.Tensor, steepness: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed ascending sort.

    Args:
        scores: `[B, n]` values to sort.
        steepness: inverse temperature s of the Cauchy relaxation.

    Returns:
        sorted: `[B, n]` relaxed sorted values (ascending).
        perm: `[B, n, n]`, `perm[b, i, j]` the relaxed probability that input i ends at rank j.
    """
    batch, n = scores.shape
    x = scores
    perm = torch.eye(n, dtype=scores.dtype, device=scores.device).expand(batch, n, n)
    for start, count in odd_even_layers(n):
        end = start + 2 * count
        a, b = x[:, start:end:2], x[:, start + 1 : end : 2]
        alpha = torch.atan(steepness * (b - a)) / math.pi + 0.5  # [B, count]
        x = torch.cat(
            (x[:, :start], _interleave(alpha * a + (1 - alpha) * b, (1 - alpha) * a + alpha * b), x[:, end:]),
            dim=1,
        )
        pa, pb = perm[:, :, start:end:2], perm[:, :, start + 1 : end : 2]
        w = alpha.unsqueeze(1)  # the same mixing for every input row
        perm = torch.cat(
            (perm[:, :, :start], _interleave(w * pa + (1 - w) * pb, (1 - w) * pa + w * pb), perm[:, :, end:]),
            dim=2,
        )
    return x, perm


def _mix(u: torch.Tensor, alpha: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """One layer's comparators applied to `u` `[B, n]`: (a, b) -> (alpha a + (1-alpha) b, (1-alpha) a + alpha b)."""
    end = start + 2 * count
    a, b = u[:, start:end:2], u[:, start + 1 : end : 2]
    return torch.cat((u[:, :start], _interleave(alpha * a + (1 - alpha) * b, (1 - alpha) * a + alpha * b), u[:, end:]),
                     dim=1)


def relaxed_rank_mass(scores: torch.Tensor, split: int, steepness: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For each input, the relaxed probability of ending below / at or above rank `split`:
    `perm[:, :, :split].sum(2)` and `perm[:, :, split:].sum(2)` of `relaxed_sort`, without the
    `[B, n, n]` matrix.

    Every layer mixes the permutation matrix's columns pairwise with a symmetric matrix M_l, so
    perm = M_1 ... M_L and perm @ m = M_1 (... (M_L m)): the column sums are two vectors pushed
    back through the layers, O(n) per layer instead of O(n^2).

    Args:
        scores: `[B, n]` values to sort.
        split: the rank that separates the two groups.

    Returns:
        below, above: `[B, n]` each.
    """
    batch, n = scores.shape
    layers = odd_even_layers(n)
    x, alphas = scores, []
    for start, count in layers:
        end = start + 2 * count
        alpha = torch.atan(steepness * (x[:, start + 1 : end : 2] - x[:, start:end:2])) / math.pi + 0.5
        alphas.append(alpha)
        x = _mix(x, alpha, start, count)
    above = (torch.arange(n, device=scores.device) >= split).to(scores.dtype).expand(batch, n)
    below = 1 - above
    for (start, count), alpha in zip(reversed(layers), reversed(alphas)):
        above, below = _mix(above, alpha, start, count), _mix(below, alpha, start, count)
    return below, above

"""Optimisation (docs/reference.md §4): SGD, LARC, and the per-iteration cosine schedule with warm-up."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from utils.registry import OPTIMIZERS, SCHEDULERS


@OPTIMIZERS.register("SGD")
def sgd(params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
        dampening: float = 0.0, nesterov: bool = False) -> torch.optim.SGD:
    """torch.optim.SGD with the config's arguments."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           dampening=dampening, nesterov=nesterov)


@OPTIMIZERS.register("Adam")
def adam(params: Iterable, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """torch.optim.Adam with the config's arguments (used by some linear-probe settings)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


class LARC:
    """Layer-wise adaptive rate control (You et al. 2017; apex's LARC, clip=False) around `optimizer`:
    g <- (g + wd * p) * trust * ||p|| / (||g|| + wd * ||p|| + eps) where both norms are non-zero,
    then the wrapped step with its weight decay off. No host sync; the state dict is the wrapped
    optimiser's, as in the released checkpoints.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.001, eps: float = 1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.eps = eps

    @property
    def param_groups(self) -> list[dict]:
        return self.optim.param_groups

    @property
    def state(self) -> dict:
        return self.optim.state

    def state_dict(self) -> dict:
        return self.optim.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optim.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        decays = []
        for group in self.optim.param_groups:
            wd = group.get("weight_decay", 0.0)
            decays.append(wd)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            p_norms = torch._foreach_norm(params)
            g_norms = torch._foreach_norm(grads)
            for p, g, pn, gn in zip(params, grads, p_norms, g_norms):
                rate = self.trust_coefficient * pn / (gn + wd * pn + self.eps)
                use = (pn > 0) & (gn > 0)
                g.copy_(torch.where(use, (g + wd * p) * rate, g))
            group["weight_decay"] = 0.0
        try:
            self.optim.step()
        finally:
            for group, wd in zip(self.optim.param_groups, decays):
                group["weight_decay"] = wd


def cosine_with_warmup(step: int, peak_lr: float, total_steps: int, warmup_steps: int) -> float:
    """lr * t / W for t < W, else 0.5 * lr * (1 + cos(pi * (t - W) / (T - W)))."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return 0.5 * peak_lr * (1 + math.cos(math.pi * (step - warmup_steps) / span))


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@SCHEDULERS.register("CustomCosineSchedulerWithWarmup", "CosineWithWarmup")
class CosineWithWarmup:
    """`cosine_with_warmup` as a config block, called with (step, peak_lr); `epochs` and
    `warmup_epochs` count its steps (epochs when linear probing steps it once per epoch)."""

    def __init__(self, epochs: int, warmup_epochs: int = 0):
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs

    def __call__(self, step: int, peak_lr: float) -> float:
        return cosine_with_warmup(step, peak_lr, self.epochs, self.warmup_epochs)

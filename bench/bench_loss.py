"""GroCo loss speed: this repository's implementation against a reference-style one (the full
similarity matrix with gradient and diffsort's dense sorting network), forward + backward.

    python -m bench.bench_loss --batch 256 1024 --dim 2048 --views 2 --device cuda
    python -m bench.bench_loss --batch 256 --views 8 --n-pos 2 --count-ops     # multi-crop, on the CPU

Prints milliseconds per call for each (and with --count-ops the operators, i.e. GPU kernels, per
call); no pass/fail.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import diffsort
import torch
import torch.nn.functional as F

from model.loss import GroCo


class ReferenceStyleGroCo(torch.nn.Module):
    """GroCo (docs/reference.md §1) computed the way the paper's code does it: all similarities
    with gradient, top-k, diffsort's matrix-product network, torch's BCELoss."""

    def __init__(self, n_augs: int, topk_neg: int = 10, steepness: float = 1.0, device: str = "cpu",
                 n_pos_augs: int | None = None):
        super().__init__()
        self.n_augs, self.k = n_augs, topk_neg
        self.n_pos = n_augs if n_pos_augs is None else n_pos_augs
        self.sorters = {n: diffsort.DiffSortNet("odd_even", n + topk_neg, steepness=steepness, device=device)
                        for n in {self.n_pos - 1, self.n_pos}}  # positives of a global / a local anchor
        self.bce = torch.nn.BCELoss()

    def forward(self, z: list[torch.Tensor]) -> torch.Tensor:
        total = 0
        for a in range(self.n_augs):
            anchor = z[a].float()
            pos = torch.stack([F.cosine_similarity(anchor, z[p].float().detach(), dim=1)
                               for p in range(self.n_pos) if p != a], dim=1)
            normed = F.normalize(anchor, dim=1, eps=1e-8)
            sim = normed @ normed.detach().T
            sim = sim.masked_fill(torch.eye(len(anchor), dtype=torch.bool, device=anchor.device), -float("inf"))
            neg = torch.topk(sim, self.k, dim=1).values.flip(1)
            scores = torch.cat((neg, torch.sort(pos, dim=1).values), dim=1)
            _, perm = self.sorters[pos.shape[1]](scores)
            n = scores.shape[1]
            target = (torch.arange(n, device=anchor.device) >= self.k).float().expand(len(anchor), n)
            pred_pos = perm[:, :, self.k:].sum(2).clamp(0, 1)
            pred_neg = perm[:, :, : self.k].sum(2).clamp(0, 1)
            total = total + (self.bce(pred_pos, target) + self.bce(pred_neg, 1 - target)) / 2
        return total / self.n_augs


def time_call(fn, views: list[torch.Tensor], repeats: int) -> float:
    """Median milliseconds of forward + backward."""
    def once() -> None:
        for v in views:
            v.grad = None
        fn(views).backward()

    for _ in range(3):
        once()
    times = []
    for _ in range(repeats):
        if views[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        if views[0].is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


VIEW_OPS = {"aten::" + name for name in (
    "slice", "as_strided", "view", "expand", "unsqueeze", "squeeze", "select", "t", "transpose", "permute", "alias",
    "detach", "reshape", "_reshape_alias", "_unsafe_view", "flatten", "narrow", "unbind", "split", "chunk", "empty",
    "empty_like", "empty_strided", "lift_fresh", "resolve_conj", "resolve_neg", "result_type", "to", "_to_copy",
    "item", "_local_scalar_dense", "is_nonzero")}


def count_ops(run: Callable[[], object]) -> int:
    """Operators that do work (a kernel each on a GPU) in one call of `run`: the leaves of the
    profiler's operator tree, views and dtype/scalar conversions left out. A hardware-independent
    measure of the launch overhead of uncompiled code."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()

    def works(event) -> bool:
        return event.name.startswith("aten::") and event.name not in VIEW_OPS

    def in_conversion(event) -> bool:  # a Python scalar wrapped as a tensor: no GPU kernel
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in ("aten::to", "aten::_to_copy"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in prof.events() if works(e) and not any(works(c) for c in e.cpu_children)
               and not in_conversion(e))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", nargs="*", default=[], metavar="MODE",
                   help="also time torch.compile(GroCo) in these modes (default, reduce-overhead, ...)")
    p.add_argument("--n-pos", type=int, help="global views (default: all; 2 for multi-crop)")
    p.add_argument("--count-ops", action="store_true", help="also count the operators of one call")
    args = p.parse_args()
    ours = GroCo(n_augs=args.views, n_pos_augs=args.n_pos)
    reference = ReferenceStyleGroCo(args.views, device=args.device, n_pos_augs=args.n_pos)
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {args.views} views, dim {args.dim}, {torch.get_num_threads()} threads")
    for batch in args.batch:
        gen = torch.Generator().manual_seed(0)
        views = [torch.randn(batch, args.dim, generator=gen).to(args.device).requires_grad_()
                 for _ in range(args.views)]
        ref_ms = time_call(reference, views, args.repeats)
        our_ms = time_call(lambda v: ours(v)[0], views, args.repeats)
        line = (f"batch {batch:5d}: reference-style {ref_ms:8.2f} ms   ours {our_ms:8.2f} ms   "
                f"ratio {our_ms / ref_ms:.2f}")
        if args.count_ops:
            line += (f"   operators per call: reference-style {count_ops(lambda v=views: reference(v).backward())}, "
                     f"ours {count_ops(lambda v=views: ours(v)[0].backward())}")
        for mode in args.compile:
            torch._dynamo.reset()  # else the second batch size would be compiled for dynamic shapes
            compiled = torch.compile(ours, mode=mode)
            ms = time_call(lambda v, fn=compiled: fn(v)[0], views, args.repeats)
            line += f"   compiled ({mode}) {ms:8.2f} ms"
        print(line)


if __name__ == "__main__":
    main()

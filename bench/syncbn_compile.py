"""Does torch.compile keep SyncBatchNorm in its graph under DDP, as the multi-GPU runs use it?

    python -m bench.syncbn_compile --arch resnet50 --batch 32      # on a CUDA machine (one GPU is enough)
    python -m bench.syncbn_compile --config configs/2views_100ep.yaml [key=value ...]

Two processes (gloo, so that both can share one GPU; `--processes N` for another count, and 1 runs
in this process) train the model of this repository (`--arch`'s ResNet with a 2048-d head, or the
encoder and head of a config with `--config`) under DDP with SyncBatchNorm, as `trainer/build.py`
builds it for several GPUs, once uncompiled and once through torch.compile (`--mode`, default
"default"). Rank 0 prints the graphs torch.compile made, its graph breaks with their reasons, the
largest difference of the compiled gradients from the uncompiled ones (relative to the largest
gradient), and the milliseconds per step of both. PyTorch's tracker said in 2025 that SyncBatchNorm
breaks the graph (pytorch/pytorch#161302); a break at every BatchNorm leaves a ResNet-50 in some 50
pieces, and most of what compiling gains with it. `--device cpu` runs the same code with plain
BatchNorm (SyncBatchNorm needs a GPU), to check the script itself.
No pass or fail.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.train_throughput import build
from utils.dist import free_port


def train_step(model: nn.Module, views: list[torch.Tensor]) -> None:
    """Forward both views, a loss that reaches every embedding, backward (DDP reduces the gradients)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(views[0].device.type, dtype=torch.bfloat16, enabled=views[0].is_cuda):
        embeddings = model(views)
    sum(z.float().square().mean() for z in embeddings).backward()


def ms_per_step(model: nn.Module, views: list[torch.Tensor], steps: int) -> float:
    for _ in range(2):
        train_step(model, views)
    if views[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, views)
    if views[0].is_cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.processes)
    try:
        probe(rank, args)  # the DDP models freed before their process group, or the exit can hang
        dist.barrier()
    finally:
        dist.destroy_process_group()


def probe(rank: int, args: argparse.Namespace) -> None:
    """Train eager and compiled DDP copies of the model one step each; rank 0 prints the report."""
    device = torch.device(args.device)
    net = network(args)
    if device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    ids = [device] if device.type == "cuda" else None
    eager = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    compiled_ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(net), device_ids=ids)
    torch._dynamo.reset()  # graphs that this process compiled before would be reused, and not counted
    compiled = torch.compile(compiled_ddp, mode=args.mode)
    gen = torch.Generator().manual_seed(rank)
    views = [torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device) for _ in range(2)]

    torch._dynamo.utils.counters.clear()
    train_step(eager, views)
    train_step(compiled, views)
    counters = torch._dynamo.utils.counters
    pairs = [(a.grad, b.grad) for a, b in zip(eager.parameters(), compiled_ddp.parameters()) if a.grad is not None]
    scale = max(a.abs().max() for a, _ in pairs)
    diff = max((a - b).abs().max() for a, b in pairs)
    times = (ms_per_step(eager, views, args.steps), ms_per_step(compiled, views, args.steps))
    if rank == 0:
        norm = "SyncBatchNorm" if device.type == "cuda" else "BatchNorm (CPU: no SyncBatchNorm)"
        print(f"{args.config or args.arch}, {norm}, torch.compile mode {args.mode}, DDP over {args.processes} "
              f"gloo processes on {device}, batch {args.batch} x 2 views of {args.size} per process")
        print(f"graphs compiled: {counters['stats']['unique_graphs']}, "
              f"graph breaks: {sum(counters['graph_break'].values())}")
        for reason, count in sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {count} x {reason[:300]}")
        print(f"largest gradient difference, compiled - eager: {float(diff / scale):.2e} of the largest gradient")
        print(f"ms per step: eager {times[0]:.1f}, compiled {times[1]:.1f}")


def network(args: argparse.Namespace) -> nn.Module:
    """The model to probe, on the CPU: the config's encoder and head, or --arch's ResNet."""
    if args.experiment is None:
        return build(args.arch, False, torch.device("cpu"))
    from trainer.build import build_network

    return build_network(args.experiment)


def experiment(args: argparse.Namespace):
    """--config with its changes, validated (None without --config); a bad one exits naming it."""
    if args.config is None:
        if args.overrides:
            raise SystemExit(f"overrides {args.overrides} need --config")
        return None
    import trainer.build  # noqa: F401  (registers the types a config names)
    from utils.config import ConfigError, apply_overrides, load_config
    from utils.schema import validate

    try:
        return validate(apply_overrides(load_config(args.config), args.overrides))
    except ConfigError as err:
        raise SystemExit(f"{args.config}: {err}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="probe this config's encoder and head instead of --arch's")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="changes to --config, as train.py takes them")
    parser.add_argument("--mode", default="default", help="torch.compile's mode",
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50", choices=("resnet10", "resnet18", "resnet50"))
    parser.add_argument("--batch", type=int, default=32, help="per process and view")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--processes", type=int, default=2, help="DDP processes (gloo)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.experiment = experiment(args)  # once, before any process starts
    if args.processes < 1:
        raise SystemExit(f"--processes must be at least 1, got {args.processes}")
    if args.processes == 1:  # in this process: nothing to spawn
        worker(0, args, free_port())
    else:
        mp.spawn(worker, args=(args, free_port()), nprocs=args.processes)


if __name__ == "__main__":
    main()

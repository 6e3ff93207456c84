"""Training throughput of one device: the reference-style step (float16 with a loss scaler, NCHW,
the reference-style GroCo loss, PIL augmentation on CPU workers) against this repository's
(bfloat16, channels_last, torch.compile, its GroCo loss, decoding and augmentation on the GPU),
on ResNet-50 with 2 x 224 views, or 2 x 224 + 6 x 96 with `--multicrop`.

    python -m bench.train_throughput --batch 256 --steps 30                       # synthetic images
    python -m bench.train_throughput --batch 256 --multicrop --compile-mode reduce-overhead
    python -m bench.train_throughput --shards 'data/train/imagenet-train-{000000..000639}.tar' \\
        --workers 16                                                              # real JPEG shards
    python -m bench.train_throughput --make-shards 4096 --workers 16              # synthetic JPEG shards

Prints, per path: samples/s, peak GPU memory and, with synthetic images, the loss's share of the
step: the same step with a trivial loss (mean square of the embeddings) is timed too, and the share
is 1 - t_trivial / t_step, so it counts the loss as it runs inside the step (compiled or not). In
real-data mode the reference-style path reads through the PIL recipe on CPU workers, and each of
ours is timed with every `--decode-on` feed: the files decoded and augmented on the GPU
(`augment_on: gpu`), and the workers decoding them and the GPU augmenting (`decode_on: cpu`), one
batch ahead on a side stream as the trainer does. No pass/fail. `--device cpu` runs the same
code on the CPU (float32, no compile unless asked), for checking the script itself.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from bench.bench_loader import make_shards
from bench.bench_loss import ReferenceStyleGroCo
from model.encoder import ResNetEncoder
from model.loss import GroCo
from model.projection import MLPProjection, SSLModel
from utils.schema import CUDA_GRAPH_MODES

N_LOCAL = 6


def build(arch: str, channels_last: bool, device: torch.device, width: int = 64) -> SSLModel:
    torch.manual_seed(0)
    encoder = ResNetEncoder(arch, width=width)
    net = SSLModel(encoder, MLPProjection(encoder.feature_dim, 3, 2048)).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def trivial_loss(embeddings: list[torch.Tensor]) -> torch.Tensor:
    """A loss that costs next to nothing and reaches every embedding: the baseline of the share."""
    return sum(z.float().square().mean() for z in embeddings)


def make_step(net: SSLModel, forward: Callable, loss_fn: Callable, dtype: Optional[torch.dtype],
              channels_last: bool, cuda_graphs: bool):
    """One optimisation step (the trainer's: autocast forward, float32 loss, scaled backward,
    unscale, clip, step); returns a function views -> loss."""
    device = next(net.parameters()).device
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step(views: list[torch.Tensor]) -> torch.Tensor:
        views = [v.contiguous(memory_format=fmt) for v in views]
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            embeddings = forward(views)
        loss = loss_fn(embeddings)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1e6)
        scaler.step(optimizer)
        scaler.update()
        return loss.detach().clone()

    return step


def view_sizes(multicrop: bool, global_size: int = 224, local_size: int = 96) -> list[int]:
    return [global_size] * 2 + ([local_size] * N_LOCAL if multicrop else [])


def synthetic(batch: int, sizes: list[int], device: torch.device) -> Iterator[list[torch.Tensor]]:
    data = [torch.randn(batch, 3, s, s, device=device) for s in sizes]
    while True:
        yield data


FEEDS = {"pil": "", "gpu": ", decoded on the GPU", "cpu": ", decoded by CPU workers"}


def shard_batches(args, n_views: int, device: torch.device, feed: str) -> Iterator[list[torch.Tensor]]:
    """Batches from JPEG shards. `feed`: 'pil', the PIL recipe on CPU workers (the reference's data
    path); 'gpu', the files decoded and augmented on the device (`augment_on: gpu`); 'cpu', the
    workers decode the files and the device augments them (`augment_on: gpu, decode_on: cpu`)."""
    from data_loader.base import LoaderRuntime, batch_generator
    from data_loader.gpu_augment import gpu_views
    from data_loader.prefetch import Prefetcher
    from data_loader.webdata import WebLoader

    loader = WebLoader(LoaderRuntime(), args.shards, args.dataset_size, args.shuffle, args.batch,
                       num_workers=args.workers, train=True,
                       transform_type="dino_multicrop" if args.multicrop else "dino", n_augs=n_views,
                       augment_on="cpu" if feed == "pil" else "gpu", decode_on="cpu" if feed == "cpu" else None)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    if feed == "pil":
        for views, _ in batches:
            yield [v.to(device, non_blocking=True) for v in views]
        return

    def prepare(batch, step: int) -> list[torch.Tensor]:
        return gpu_views(*batch, loader.gpu_recipe, device, batch_generator(0, 0, step))[0]

    with Prefetcher(batches, prepare, device) as prepared:  # as the trainer does: one batch ahead
        yield from prepared


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step: Callable, batches: Iterator, steps: int, warmup: int, batch: int,
            device: torch.device) -> tuple[float, Optional[float]]:
    """(samples/s, peak GPU GiB or None) over `steps` steps after `warmup` steps."""
    for _ in range(warmup):
        step(next(batches))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    _sync(device)
    rate = steps * batch / (time.perf_counter() - start)
    return rate, torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def paths(args, n_views: int, device: torch.device) -> dict[str, tuple]:
    """name -> (autocast dtype, channels_last, compile mode or None, loss, data on the GPU)."""
    n_pos = 2 if args.multicrop else n_views
    reference = ReferenceStyleGroCo(n_views, device=device.type, n_pos_augs=n_pos)
    groco = GroCo(n_augs=n_views, n_pos_augs=n_pos)

    def ours(embeddings: list[torch.Tensor]) -> torch.Tensor:
        return groco(embeddings)[0]

    fp16 = torch.float16 if device.type == "cuda" else None
    bf16 = torch.bfloat16 if device.type == "cuda" else None
    table = {"reference-style (fp16, NCHW)": (fp16, False, None, reference, False)}
    if not args.short:
        table["fp16, NCHW, our loss"] = (fp16, False, None, ours, True)
        table["bf16, channels_last, our loss"] = (bf16, True, None, ours, True)
    for mode in args.compile_mode:
        table[f"bf16, channels_last, compile {mode}, our loss"] = (bf16, True, mode, ours, True)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--width", type=int, default=64,
                   help="channels of the first stage (smaller ones only to check the script quickly)")
    p.add_argument("--batch", type=int, default=256, help="per-GPU batch")
    p.add_argument("--multicrop", action="store_true", help="2 x 224 + 6 x 96 views (else 2 x 224)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile-mode", nargs="*", default=["default"], metavar="MODE",
                   help="torch.compile modes to time for ours (none: leave compile out)")
    p.add_argument("--short", action="store_true", help="only the reference-style path and the compiled ones")
    p.add_argument("--shards", help="JPEG shards (brace pattern): real-data mode")
    p.add_argument("--make-shards", type=int, metavar="N",
                   help="real-data mode on N synthetic ImageNet-sized JPEGs sharded into a temporary folder")
    p.add_argument("--dataset-size", type=int, default=1281167)
    p.add_argument("--shuffle", type=int, default=10000, help="shuffle buffer of the shard loader")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--decode-on", nargs="+", choices=("gpu", "cpu"), default=["gpu", "cpu"],
                   help="real-data mode: where our paths decode the JPEG files (each timed)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs=2, default=[224, 96], metavar=("GLOBAL", "LOCAL"),
                   help="synthetic view sizes (smaller ones only to check the script quickly)")
    args = p.parse_args()
    if args.make_shards:
        with tempfile.TemporaryDirectory() as tmp:
            # two shards per worker at least: the training loader gives every worker shards of its own
            shard_size = max(1, min(256, args.make_shards // (2 * max(1, args.workers))))
            args.shards = make_shards(Path(tmp), args.make_shards, shard_size=shard_size)
            args.dataset_size = args.make_shards
            run(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/train_throughput.py: no GPU is available (--device cpu checks the script)")
    torch.backends.cudnn.benchmark = True
    sizes = view_sizes(args.multicrop, *args.sizes)
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads, float32 on every path")
    print(f"{name}, torch {torch.__version__}, {args.arch}, batch {args.batch}, views {sizes}, "
          f"{'shards ' + args.shards if args.shards else 'synthetic images'}")
    for label, (dtype, channels_last, mode, loss_fn, data_on_gpu) in paths(args, len(sizes), device).items():
        net = build(args.arch, channels_last, device, args.width)
        forward = torch.compile(net, mode=mode) if mode else net
        compiled_loss = torch.compile(loss_fn, mode=mode) if mode else loss_fn
        cuda_graphs = mode in CUDA_GRAPH_MODES and device.type == "cuda"
        if args.shards:
            step = make_step(net, forward, compiled_loss, dtype, channels_last, cuda_graphs)
            for feed in args.decode_on if data_on_gpu else ["pil"]:
                batches = shard_batches(args, len(sizes), device, feed)
                rate, memory = measure(step, batches, args.steps, args.warmup, args.batch, device)
                batches.close()  # ends a prefetching thread
                print(f"{label + FEEDS[feed]:76s} {rate:8.0f} samples/s   {_memory(memory)}", flush=True)
        else:
            rates, memories = {}, {}
            for kind, fn in {"step": compiled_loss, "trivial": torch.compile(trivial_loss, mode=mode) if mode
                             else trivial_loss}.items():
                step = make_step(net, forward, fn, dtype, channels_last, cuda_graphs)
                rates[kind], memories[kind] = measure(step, synthetic(args.batch, sizes, device), args.steps,
                                                      args.warmup, args.batch, device)
            share = 1 - rates["step"] / rates["trivial"]
            print(f"{label:52s} {rates['step']:8.0f} samples/s   {_memory(memories['step'])}   "
                  f"loss {share:6.1%} of the step", flush=True)
        del net, forward, step
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _memory(gib: Optional[float]) -> str:
    return f"peak {gib:5.1f} GiB" if gib is not None else "peak   n/a    "


if __name__ == "__main__":
    main()

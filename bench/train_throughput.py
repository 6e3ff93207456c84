"""Training throughput of one GPU: the reference-style step (float16 with a loss scaler, NCHW, the
reference-style GroCo loss) against this repository's (bfloat16, channels_last, torch.compile, its
GroCo loss), on ResNet-50 with V views of 224 px.

    python -m bench.train_throughput --batch 256 --views 2 --steps 30            # synthetic images
    python -m bench.train_throughput --shards 'data/train/imagenet-train-{000000..000639}.tar' \\
        --dataset-size 1280000 --workers 16                                      # real JPEG shards

In real-data mode the reference-style path reads through the PIL recipe on CPU workers and the
other paths decode and augment on the GPU (`augment_on: gpu`). Prints samples/s, peak GPU memory
and the loss's share of the step (the loss timed alone and uncompiled, forward and backward, on
embeddings of the step's size); no pass/fail.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Callable, Iterator

import torch

from bench.bench_loss import ReferenceStyleGroCo
from model.encoder import ResNetEncoder
from model.loss import GroCo
from model.projection import MLPProjection, SSLModel


def build(arch: str, channels_last: bool, device: torch.device) -> SSLModel:
    torch.manual_seed(0)
    net = SSLModel(ResNetEncoder(arch), MLPProjection(2048 if arch == "resnet50" else 512, 3, 2048)).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def make_step(net: SSLModel, loss_fn: Callable, dtype: torch.dtype, channels_last: bool, compile_model: bool):
    """One optimisation step on `views`; returns a function views -> loss tensor."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    forward = torch.compile(net) if compile_model else net
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step(views: list[torch.Tensor]) -> torch.Tensor:
        views = [v.contiguous(memory_format=fmt) for v in views]
        with torch.autocast("cuda", dtype=dtype):
            embeddings = forward(views)
        loss = loss_fn(embeddings)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1e6)
        scaler.step(optimizer)
        scaler.update()
        return loss

    return step


def synthetic(batch: int, views: int, device: torch.device) -> Iterator[list[torch.Tensor]]:
    data = [torch.randn(batch, 3, 224, 224, device=device) for _ in range(views)]
    while True:
        yield data


def shard_batches(args, views: int, device: torch.device, on_gpu: bool) -> Iterator[list[torch.Tensor]]:
    """Batches from JPEG shards: the PIL recipe on CPU workers (the reference's data path), or with
    `on_gpu` the files decoded and augmented on the GPU (`augment_on: gpu`)."""
    from data_loader.base import LoaderRuntime, batch_generator
    from data_loader.gpu_augment import gpu_views
    from data_loader.webdata import WebLoader

    loader = WebLoader(LoaderRuntime(), args.shards, args.dataset_size, 10000, args.batch, num_workers=args.workers,
                       transform_type="dino", n_augs=views, augment_on="gpu" if on_gpu else "cpu")
    for step, (batch, labels) in enumerate(itertools.chain.from_iterable(itertools.repeat(loader))):
        if on_gpu:
            yield gpu_views(batch, labels, loader.gpu_recipe, device, batch_generator(0, 0, step))[0]
        else:
            yield [v.to(device, non_blocking=True) for v in batch]


def measure(step: Callable, batches: Iterator, steps: int, warmup: int, batch: int) -> tuple[float, float]:
    """(samples/s, peak GPU GiB) over `steps` steps after `warmup` steps."""
    for _ in range(warmup):
        step(next(batches))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start), torch.cuda.max_memory_allocated() / 2**30


def loss_ms(loss_fn: Callable, batch: int, views: int, repeats: int = 20) -> float:
    """Milliseconds of the loss alone, forward and backward, on [batch, 2048] embeddings."""
    z = [torch.randn(batch, 2048, device="cuda", requires_grad=True) for _ in range(views)]
    for _ in range(3):
        loss_fn(z).backward()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        loss_fn(z).backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=256, help="per-GPU batch")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--shards", help="JPEG shards (brace pattern): real-data mode")
    p.add_argument("--dataset-size", type=int, default=1280000)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--skip-compile", action="store_true", help="leave torch.compile out of 'ours'")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/train_throughput.py measures a GPU; none is available")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.arch}, batch {args.batch}, "
          f"{args.views} x 224, {'shards ' + args.shards if args.shards else 'synthetic images'}")
    reference_loss = ReferenceStyleGroCo(args.views, device="cuda")
    ours_loss = GroCo(n_augs=args.views)
    paths = {
        "reference-style (fp16, NCHW)": (torch.float16, False, False, reference_loss),
        "fp16, NCHW, our loss": (torch.float16, False, False, lambda z: ours_loss(z)[0]),
        "bf16, channels_last, our loss": (torch.bfloat16, True, False, lambda z: ours_loss(z)[0]),
    }
    if not args.skip_compile:
        paths["bf16, channels_last, compile, our loss"] = (torch.bfloat16, True, True, lambda z: ours_loss(z)[0])
    for name, (dtype, channels_last, compile_model, loss_fn) in paths.items():
        net = build(args.arch, channels_last, device)
        step = make_step(net, loss_fn, dtype, channels_last, compile_model)
        on_gpu = not name.startswith("reference")  # ours decodes and augments on the GPU
        batches = (shard_batches(args, args.views, device, on_gpu) if args.shards
                   else synthetic(args.batch, args.views, device))
        rate, memory = measure(step, batches, args.steps, args.warmup, args.batch)
        step_ms = args.batch / rate * 1000
        share = loss_ms(loss_fn, args.batch, args.views) / step_ms
        print(f"{name:42s} {rate:8.0f} samples/s   peak {memory:5.1f} GiB   loss {share:5.1%} of the step")
        del net, step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

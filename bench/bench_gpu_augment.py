"""Throughput of the batched recipes (data_loader.gpu_augment, docs/reference.md §5) against the PIL recipes.

    python -m bench.bench_gpu_augment --device cuda --workers 16 --batches 5

Encodes `--batch-size` synthetic ImageNet-sized JPEGs (500 x 375 or 375 x 500, bench_loader's
photo-like images), then times for `dino` (2 views) and `dino_multicrop` (8 views):
- decode: `decode_batch` of the whole batch on --device;
- decode + augment: `gpu_views` on --device (device synchronised before the clock stops);
- augment only: `gpu_views` of the images decoded beforehand by PIL and packed (pinned on CUDA), as
  loader workers hand them over with `decode_on: cpu`; the copy to the device is timed too;
- PIL: decode + the PIL recipe of data_loader.transforms on a Pool of --workers CPU processes.
It prints samples per second; there is no pass or fail. `--count-ops` also prints the operators
one batch's augmentation runs (a kernel launch each on a GPU; counted on the CPU as
`bench_loss --count-ops` counts them, the CPU-side index bookkeeping included).
"""

from __future__ import annotations

import argparse
import io
import time
from multiprocessing import Pool

import numpy as np
import torch

from bench.bench_loader import synthetic_photo
from bench.bench_loss import count_ops
from data_loader.decode import decode_batch, decode_image
from data_loader.gpu_augment import GpuRecipe, gpu_views
from data_loader.transforms import PackedImages, build_transform, image_array

RECIPES = {"dino": 2, "dino_multicrop": 8}


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """`n` synthetic photo JPEGs (quality 90)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        synthetic_photo(rng).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, n_samples: int, batches: int, device: torch.device) -> float:
    """Samples per second of `fn()` (one batch of n_samples) over `batches` calls after one warm-up."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    sync(device)
    return batches * n_samples / (time.perf_counter() - start)


_PIL_TRANSFORM = None


def _pil_init(recipe: str) -> None:
    global _PIL_TRANSFORM
    torch.set_num_threads(1)  # one core per worker, like a DataLoader worker
    _PIL_TRANSFORM = build_transform(recipe, RECIPES[recipe])


def _pil_one(data: bytes) -> int:
    views = _PIL_TRANSFORM(decode_image(data, "bench"))
    return len(views)


def pil_rate(jpegs: list[bytes], recipe: str, workers: int, batches: int) -> float:
    """Samples per second of decode + PIL recipe on `workers` processes."""
    with Pool(workers, initializer=_pil_init, initargs=(recipe,)) as pool:
        pool.map(_pil_one, jpegs[: workers * 4])  # start-up
        start = time.perf_counter()
        for _ in range(batches):
            pool.map(_pil_one, jpegs, chunksize=16)
        return batches * len(jpegs) / (time.perf_counter() - start)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=4, help="CPU processes of the PIL baseline (0: skip it)")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--count-ops", action="store_true", help="also count the operators of one batch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    jpegs = make_jpegs(args.batch_size)
    labels = torch.zeros(args.batch_size, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    print(f"device {device}, batch {args.batch_size}, {np.mean([len(j) for j in jpegs]) / 1024:.0f} KB per JPEG")
    print(f"decode only: {rate(lambda: decode_batch(jpegs, device), args.batch_size, args.batches, device):.0f} "
          f"samples/s")
    packed = PackedImages.pack([image_array(decode_image(j, "bench")) for j in jpegs])
    if device.type == "cuda":
        packed = packed.pin_memory()  # as the DataLoader pins a batch
    for recipe in args.recipes:
        gpu = GpuRecipe(recipe, RECIPES[recipe])
        fast = rate(lambda gpu=gpu: gpu_views(jpegs, labels, gpu, device, gen), args.batch_size, args.batches, device)
        pixels = rate(lambda gpu=gpu: gpu_views(packed, labels, gpu, device, gen), args.batch_size, args.batches,
                      device)
        line = (f"{recipe} ({RECIPES[recipe]} views): decode + augment on {device} {fast:.0f} samples/s; "
                f"augment only (decode_on: cpu) {pixels:.0f} samples/s")
        if args.count_ops:
            images = decode_batch(jpegs, device)
            fresh = torch.Generator().manual_seed(0)  # the count depends on the draws (empty subsets are skipped)
            line += f"; {count_ops(lambda r=gpu, im=images, g=fresh: r(im, g))} operators per batch"
        if args.workers > 0:
            slow = pil_rate(jpegs, recipe, args.workers, args.batches)
            line += f"; PIL on {args.workers} processes {slow:.0f} samples/s ({slow / args.workers:.0f} per process)"
        print(line, flush=True)


if __name__ == "__main__":
    main()

"""Throughput of the shard loader (docs/reference.md §5) with the paper's augmentation recipes.

    python -m bench.bench_loader --workers 1 2 4 --batches 20

Writes a few hundred synthetic ImageNet-sized JPEGs (500 x 375 or 375 x 500, smooth colour fields
with texture, about the size of an ImageNet photo on disk) into a temporary folder, shards them with
`preprocessing/create_tar_webdataset.py`, and times the training loader (`dino` with 2 views and
`dino_multicrop` with 8) for every worker count: samples per second in total and per worker, after
a warm-up that starts the workers. It prints figures; there is no pass or fail. The reference code's
PIL pipeline fed 712 samples/s on 16 cores for 2 x 224 (docs/reference.md §9).

`--augment-on gpu` times the CPU side of `augment_on: gpu` instead: the workers only read the
shards and pack the batch's JPEG files into one buffer (decoding and augmentation then happen on
the GPU), so the recipe does not matter and one line per worker count is printed. With
`--decode-on cpu` too, the workers also decode the files with PIL and pack the pixels
(`decode_on: cpu`, where the GPU only augments). Every line also gives the CPU time the main
(training) process spends per batch receiving it, with all its threads: on a GPU machine that time
competes with the training step for the interpreter.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_loader.base import LoaderRuntime
from data_loader.webdata import WebLoader
from preprocessing import create_tar_webdataset

logger = logging.getLogger("bench_loader")

RECIPES = {"dino": 2, "dino_multicrop": 8}
RECIPE_OF_BYTES = "dino"  # augment_on gpu: the loader needs a GPU recipe but never runs it
N_CLASSES = 10


def synthetic_photo(rng: np.random.Generator) -> Image.Image:
    """A 500 x 375 (or 375 x 500) RGB image: a smooth random colour field plus fine noise, so that
    the JPEG has photo-like size and decoding cost."""
    width, height = (500, 375) if rng.random() < 0.75 else (375, 500)
    coarse = rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))


def make_shards(folder: Path, n_images: int, shard_size: int, seed: int = 0) -> str:
    """Write `n_images` JPEGs as an image-folder tree, shard it; return the shards' brace pattern."""
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        path = folder / "raw" / "train" / f"c{i % N_CLASSES:03d}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_photo(rng).save(path, "JPEG", quality=90)
    counts = create_tar_webdataset.main(["--input", str(folder / "raw"), "--output", str(folder / "shards"),
                                         "--splits", "train", "--train-shard-size", str(shard_size)])
    n_shards = -(-counts["train"] // shard_size)
    mean_kb = sum(p.stat().st_size for p in (folder / "raw").rglob("*.JPEG")) / n_images / 1024
    logger.info("%d JPEGs (%.0f KB on average) in %d shards", n_images, mean_kb, n_shards)
    return f"{folder}/shards/train/imagenet-train-{{000000..{n_shards - 1:06d}}}.tar"


def time_loader(shards: str, recipe: str, workers: int, batch_size: int, batches: int, warmup: int,
                augment_on: str = "cpu", decode_on: str | None = None) -> tuple[float, float]:
    """(samples per second, CPU milliseconds of the training process per batch) of the training
    loader over `batches` batches after `warmup` batches. The second is what receiving a batch from
    the workers costs the process that trains (all its threads; the workers not counted)."""
    loader = WebLoader(LoaderRuntime(), shards, dataset_size=(batches + warmup) * batch_size, shuffle=100,
                       batch_size=batch_size, num_workers=workers, transform_type=recipe, n_augs=RECIPES[recipe],
                       augment_on=augment_on, decode_on=decode_on)
    start = cpu = None
    for step, _ in enumerate(loader):
        if step == warmup - 1:
            start, cpu = time.perf_counter(), time.process_time()
    return batches * batch_size / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / batches


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to time")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=320, help="synthetic JPEGs to generate")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--augment-on", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: time only reading and batching the JPEG files (augment_on: gpu)")
    parser.add_argument("--decode-on", choices=("cpu", "gpu"), default=None,
                        help="with --augment-on gpu: cpu times the workers decoding the files too (decode_on: cpu)")
    args = parser.parse_args(argv)
    if min(args.workers) < 0 or args.batches < 1 or args.warmup < 1:
        parser.error("--workers must not be negative, --batches and --warmup must be positive")
    if args.decode_on == "gpu" and args.augment_on == "cpu":
        parser.error("--decode-on gpu needs --augment-on gpu")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; return one row per (recipe, workers)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shard_size = max(1, args.images // (2 * max(max(args.workers), 1)))
        shards = make_shards(Path(tmp), args.images, shard_size)
        logger.info("%d CPU cores; batch %d, %d timed batches after %d warm-up", os.cpu_count(), args.batch_size,
                    args.batches, args.warmup)
        logger.info("%-16s %8s %14s %16s %22s", "recipe", "workers", "samples/s", "per worker", "main CPU ms/batch")
        recipes = args.recipes
        if args.augment_on == "gpu":
            recipes = ["decoded pixels" if args.decode_on == "cpu" else "JPEG bytes only"]
        for recipe in recipes:
            for workers in args.workers:
                rate, cpu_ms = time_loader(shards, RECIPE_OF_BYTES if args.augment_on == "gpu" else recipe, workers,
                                           args.batch_size, args.batches, args.warmup, args.augment_on,
                                           args.decode_on)
                rows.append({"recipe": recipe, "workers": workers, "samples_per_s": rate, "main_cpu_ms": cpu_ms})
                logger.info("%-16s %8d %14.1f %16.1f %22.1f", recipe, workers, rate, rate / max(workers, 1), cpu_ms)
    return rows


if __name__ == "__main__":
    main()

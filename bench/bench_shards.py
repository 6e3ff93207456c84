"""Shard writing from ImageNet's archives read in place: images/s of the index pass (tar headers
only) and of the writing with 1, 2 and N processes (`--workers`), on generated archives.

    python -m bench.bench_shards --images 3000

The archives hold `--images` JPEGs of about 110 KB (ImageNet's mean), 90% in a train tar of 10
class tars, 10% in a val tar, with a devkit; they are written to a temporary folder (or `--dir`)
and removed at the end. Freshly written, they are in the page cache: the reads are the cache's,
the shard writes (each fsynced) the disk's.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import create_tar_webdataset as shards  # noqa: E402
from preprocessing import imagenet_archives  # noqa: E402

IMAGENET_IMAGES = 1_281_167 + 50_000
CLASSES = 10


def jpegs(count: int) -> list[bytes]:
    """`count` distinct JPEGs of about 110 KB (500 x 375, noise over a gradient)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = np.linspace(0, 200, 500 * 375 * 3).reshape(375, 500, 3)
    out = []
    for _ in range(count):
        pixels = np.clip(base + rng.normal(0, 27, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_archives(root: Path, images: int) -> None:
    import scipy.io

    pool = jpegs(16)
    n_val = max(CLASSES, images // 10)
    per_class = (images - n_val) // CLASSES
    wnids = [f"n{9000000 + i:08d}" for i in range(CLASSES)]
    with tarfile.open(root / imagenet_archives.TRAIN_TAR, "w") as outer:
        for c, wnid in enumerate(wnids):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as inner:
                for i in range(per_class):
                    add(inner, f"{wnid}_{i}.JPEG", pool[(c + i) % len(pool)])
            add(outer, f"{wnid}.tar", buffer.getvalue())
    with tarfile.open(root / imagenet_archives.VAL_TAR, "w") as val:
        for i in range(n_val):
            add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", pool[i % len(pool)])
    synsets = np.zeros((CLASSES, 1), dtype=[(name, "O") for name in (
        "ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images")])
    for i, wnid in enumerate(wnids):
        synsets[i, 0] = (i + 1, wnid, f"class {i}", "", 0, np.zeros((1, 0)), 0, per_class)
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    truth = "".join(f"{i % CLASSES + 1}\n" for i in range(n_val)).encode()
    with tarfile.open(root / imagenet_archives.DEVKIT, "w:gz") as devkit:
        add(devkit, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        add(devkit, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="images in the generated archives")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="writer process counts (default: 1, 2 and the script's default)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)
    workers = args.workers or sorted({1, 2, shards.default_workers()})
    folder = Path(tempfile.mkdtemp(prefix="bench_shards_", dir=args.dir))
    try:
        (folder / "original").mkdir()
        started = time.perf_counter()
        make_archives(folder / "original", args.images)
        size = sum(p.stat().st_size for p in (folder / "original").iterdir())
        print(f"archives: {size / 2**20:.0f} MiB in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        source = shards.read_imagenet_archives(folder / "original", ["train", "val"])
        index_s = time.perf_counter() - started
        n = sum(len(samples) for samples in source.samples.values())
        figures = {"images": n, "mean_kb": size / n / 1000, "index_images_per_s": n / index_s}
        print(f"index pass: {n} images in {index_s:.3f} s, {n / index_s:,.0f} images/s")
        records = {split: shards.make_records(source.samples[split], source.metadata["wnids"], 0,
                                              source.locations[split]) for split in source.samples}
        for count in workers:
            out = folder / f"out{count}"
            started = time.perf_counter()
            for split, split_records in records.items():
                shards.write_split(split_records, out / split, split, 200 if split == "train" else 50, False, count)
            seconds = time.perf_counter() - started
            rate = n / seconds
            figures[f"write_images_per_s_{count}"] = rate
            print(f"write, {count} worker(s): {seconds:.2f} s, {rate:,.0f} images/s, "
                  f"{rate * size / n / 2**20:.0f} MiB/s; ImageNet's {IMAGENET_IMAGES:,} images: "
                  f"{IMAGENET_IMAGES / rate / 60:.0f} min")
            shutil.rmtree(out)
        print(f"index pass for ImageNet: {IMAGENET_IMAGES / figures['index_images_per_s']:.0f} s")
        return figures
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()

"""Write ImageNet, or any image-folder dataset, as WebDataset shards (docs/reference.md §5).

    python preprocessing/create_tar_webdataset.py --input data/imagenet/original --output data/imagenet/processed

Input: ImageNet's original archives (or torchvision's parsed folder with `meta.bin`), read and on
first use extracted (about 150 GB) by torchvision's parser; or a tree `train/<class>/*`,
`val/<class>/*` (sorted class folders give the indices; a folder's name is its wnid and class); or,
with `--splits train`, unlabelled images directly in `train/` (`cls` -1, empty `wnid`, no classes).

Output: `OUT/{train,val}/imagenet-{train,val}-%06d.tar` (2,000 / 500 samples each, shuffled with
`--seed`) and `OUT/metadata.json`, which adds `shard_samples` (samples per `split/file name`) so a
reader can count what a truncated shard lost. A sample is `KEY.image.jpg` (the file's bytes, never
re-encoded) and `KEY.metadata.pyd` (pickled `{'cls': int, 'wnid': str}`). Shards are written under
a temporary name and renamed when complete. Images are copied, not decoded; `--verify` decodes
every image first and writes nothing if one fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import random
import sys
from pathlib import Path

from tqdm import tqdm

if __package__ in (None, ""):  # run as a script (the README's command): the repository, for data_loader
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("create_tar_webdataset")

IMAGENET_FILES = ("meta.bin", "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
SPLITS = ("train", "val")
PARTIAL_SUFFIX = ".partial"


@dataclasses.dataclass(frozen=True)
class Record:
    """One image to write: its key, file, class index and wnid."""

    key: str
    path: str
    cls: int
    wnid: str


@dataclasses.dataclass
class Source:
    """A dataset to shard: the metadata.json content and [(image path, class index)] per split."""

    metadata: dict
    samples: dict[str, list[tuple[str, int]]]


# ----------------------------------------------------------------------------- reading the input


def read_imagenet(root: Path, splits: list[str]) -> Source:
    """ImageNet through torchvision's parser (which extracts the archives on first use)."""
    from torchvision.datasets import ImageNet

    datasets = {split: ImageNet(str(root), split=split) for split in splits}
    first = datasets[splits[0]]
    for split, dataset in datasets.items():
        if dataset.wnids != first.wnids:
            raise ValueError(f"{root}: the {split} split has other classes than the {splits[0]} split")
    metadata = {
        "wnids": list(first.wnids),
        "classes": [list(names) for names in first.classes],
        "wnid_to_idx": dict(first.wnid_to_idx),
        "class_to_idx": dict(first.class_to_idx),
    }
    return Source(metadata, {split: list(dataset.samples) for split, dataset in datasets.items()})


def read_image_folders(root: Path, splits: list[str]) -> Source:
    """An extracted tree `root/<split>/<class>/*`; the classes are the sorted folders of `root/train`,
    hidden ones left out, as the image-folder loader reads them (`data_loader.folder.image_tree`)."""
    from torchvision.datasets.folder import make_dataset

    from data_loader.folder import UNLABELLED, image_tree, is_image_file

    classes, loose = image_tree(root / "train")
    if classes and loose:
        raise ValueError(f"{root / 'train'} holds {len(classes)} class folders and {len(loose)} image files outside "
                         f"them ({Path(loose[0]).name}, ...): put every image in a class folder, or, for unlabelled "
                         f"images, every image directly in {root / 'train'}")
    if loose:
        if splits != ["train"]:
            raise ValueError(f"{root / 'train'}: images without class folders (unlabelled) make a train split "
                             f"alone; pass --splits train")
        metadata = {"wnids": [], "classes": [], "wnid_to_idx": {}, "class_to_idx": {}}
        return Source(metadata, {"train": [(path, UNLABELLED) for path in loose]})
    if not classes:
        raise FileNotFoundError(f"{root / 'train'}: no class folders and no image files")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = {}
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir}: no such folder")
        unknown = sorted(set(image_tree(split_dir)[0]) - set(classes))
        if unknown:
            raise ValueError(f"{split_dir}: class folders {unknown[:5]} are not in {root / 'train'}")
        samples[split] = make_dataset(split_dir, class_to_idx, is_valid_file=is_image_file, allow_empty=True)
    metadata = {"wnids": classes, "classes": classes, "wnid_to_idx": class_to_idx, "class_to_idx": class_to_idx}
    return Source(metadata, samples)


def read_source(root: Path, splits: list[str]) -> Source:
    """The dataset at `root`: the ImageNet files when present, otherwise an image-folder tree."""
    if any((root / name).exists() for name in IMAGENET_FILES):
        logger.info("%s: ImageNet archives or torchvision's meta.bin found; reading through torchvision", root)
        return read_imagenet(root, splits)
    if (root / "train").is_dir():
        logger.info("%s: reading the image folders %s", root, ", ".join(splits))
        return read_image_folders(root, splits)
    raise FileNotFoundError(
        f"{root}: neither ImageNet's files ({', '.join(IMAGENET_FILES)}) nor a train/<class>/ folder tree"
    )


def sample_keys(paths: list[str]) -> list[str]:
    """The samples' keys: each file's name without its extension (ImageNet's `n01440764_10026`).
    Where that repeats within the split (`cat/001.jpg`, `dog/001.jpg`) or holds a dot (WebDataset
    cuts a key at its first dot), every key of the split is `<class folder>_<name>` with dots made
    underscores instead; keys that still repeat are an error."""
    names = [os.path.basename(path).rsplit(".", 1)[0] for path in paths]
    if len(set(names)) == len(names) and not any("." in name or not name for name in names):
        return names
    keys = [f"{os.path.basename(os.path.dirname(path))}_{name}".replace(".", "_") for path, name in zip(paths, names)]
    logger.warning("file names repeat across class folders or hold dots: the keys are <class folder>_<name> "
                   "(%s, ...)", keys[0])
    seen: dict[str, str] = {}
    for path, key in zip(paths, keys):
        if key in seen:
            raise ValueError(f"{path} and {seen[key]} give the same key {key!r}; keys must be unique in a split, "
                             "rename one of the files")
        seen[key] = path
    return keys


def make_records(samples: list[tuple[str, int]], wnids: list[str], seed: int) -> list[Record]:
    """Records (keys from `sample_keys`) in a random order fixed by `seed`."""
    keys = sample_keys([path for path, _ in samples])
    records = [Record(key, path, cls, wnids[cls] if cls >= 0 else "")  # unlabelled: -1
               for key, (path, cls) in zip(keys, samples)]
    random.Random(seed).shuffle(records)
    return records


def verify_images(records: list[Record]) -> None:
    """Decode every image; raise naming the files that PIL cannot read."""
    from PIL import Image

    failed = []
    for record in tqdm(records, desc="verify", unit="img"):
        try:
            with Image.open(record.path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            failed.append(f"{record.path} ({err})")
    if failed:
        raise ValueError(f"{len(failed)} undecodable image(s), nothing written: " + "; ".join(failed[:20]))


# ----------------------------------------------------------------------------- writing the shards


def write_shard(records: list[Record], path: Path, progress: tqdm) -> int:
    """Write one shard through a temporary file renamed at the end; return the samples written."""
    import webdataset as wds

    from utils.files import atomic_write

    written = 0
    with atomic_write(path, path.with_name(path.name + PARTIAL_SUFFIX)) as stream:
        with wds.TarWriter(stream, encoder=False, mtime=0) as sink:
            for record in records:
                with open(record.path, "rb") as f:
                    image = f.read()
                meta = pickle.dumps({"cls": record.cls, "wnid": record.wnid})
                sink.write({"__key__": record.key, "image.jpg": image, "metadata.pyd": meta})
                written += 1
                progress.update(1)
    return written


def clear_split_folder(folder: Path, split: str, overwrite: bool) -> None:
    """Refuse to mix with an earlier run's shards unless `overwrite`, then remove them."""
    old = sorted(folder.glob(f"imagenet-{split}-*.tar")) + sorted(folder.glob(f"imagenet-{split}-*{PARTIAL_SUFFIX}"))
    if old and not overwrite:
        raise FileExistsError(f"{folder} already holds {len(old)} shard file(s) ({old[0].name}, ...); "
                              "pass --overwrite to replace them")
    for path in old:
        path.unlink()


def write_split(records: list[Record], folder: Path, split: str, shard_size: int, overwrite: bool) -> dict[str, int]:
    """Write `records` as `folder/imagenet-{split}-%06d.tar` of `shard_size` samples; return the
    samples written to each shard, by `split/file name`."""
    folder.mkdir(parents=True, exist_ok=True)
    clear_split_folder(folder, split, overwrite)
    counts = {}
    with tqdm(total=len(records), desc=f"{split} shards", unit="img") as progress:
        for index, start in enumerate(range(0, len(records), shard_size)):
            path = folder / f"imagenet-{split}-{index:06d}.tar"
            counts[f"{split}/{path.name}"] = write_shard(records[start:start + shard_size], path, progress)
    written = sum(counts.values())
    if written != len(records):
        raise RuntimeError(f"{split}: wrote {written} samples but found {len(records)} images")
    n_shards = -(-written // shard_size)
    logger.info("%s: %d samples in %d shards, %s", split, written, n_shards,
                f"{folder}/imagenet-{split}-{{000000..{n_shards - 1:06d}}}.tar")
    return counts


def write_metadata(metadata: dict, shard_samples: dict[str, int], path: Path) -> None:
    """Write `metadata` and `shard_samples` to `path`, keeping the shard counts of the splits that
    an earlier run wrote and this one did not (`--splits`)."""
    from utils.files import atomic_write

    written_splits = {name.split("/")[0] for name in shard_samples}
    try:
        earlier = json.loads(path.read_text()).get("shard_samples", {})
    except (OSError, ValueError, AttributeError):
        earlier = {}
    kept = {name: n for name, n in earlier.items() if name.split("/")[0] not in written_splits}
    metadata = {**metadata, "shard_samples": {**kept, **shard_samples}}
    with atomic_write(path, path.with_name(path.name + PARTIAL_SUFFIX)) as f:
        f.write(json.dumps(metadata).encode())


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="ImageNet's files or a train/ val/ folder tree")
    parser.add_argument("--output", required=True, type=Path, help="where train/, val/ and metadata.json go")
    parser.add_argument("--train-shard-size", type=int, default=2000, help="samples per train shard")
    parser.add_argument("--val-shard-size", type=int, default=500, help="samples per val shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order in which samples are written")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to write")
    parser.add_argument("--verify", action="store_true", help="decode every image first; stop if one fails")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run")
    args = parser.parse_args(argv)
    if args.train_shard_size < 1 or args.val_shard_size < 1:
        parser.error("shard sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Shard the dataset; return the number of samples written per split."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    source = read_source(args.input, args.splits)
    shard_sizes = {"train": args.train_shard_size, "val": args.val_shard_size}
    plans = {split: make_records(source.samples[split], source.metadata["wnids"], args.seed) for split in args.splits}
    empty = [split for split, records in plans.items() if not records]
    if empty:
        raise FileNotFoundError(f"{args.input}: no images in the split(s) {empty}")
    if args.verify:
        verify_images([record for records in plans.values() for record in records])
    counts, shard_samples = {}, {}
    for split, records in plans.items():
        written = write_split(records, args.output / split, split, shard_sizes[split], args.overwrite)
        counts[split] = sum(written.values())
        shard_samples.update(written)
    write_metadata(source.metadata, shard_samples, args.output / "metadata.json")
    logger.info("wrote %s and %s", args.output / "metadata.json", counts)
    return counts


if __name__ == "__main__":
    main()

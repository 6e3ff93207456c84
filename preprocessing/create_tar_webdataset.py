"""Write ImageNet, or any image-folder dataset, as WebDataset shards (docs/reference.md §5).

    python preprocessing/create_tar_webdataset.py --input data/imagenet/original --output data/imagenet/processed

Input: ImageNet's original archives (`ILSVRC2012_img_train.tar`, `ILSVRC2012_img_val.tar`,
`ILSVRC2012_devkit_t12.tar.gz`), read in place: an index pass reads the tar headers only, the shards
take each image's bytes at its offset, nothing is extracted or written beside them
(`preprocessing/imagenet_archives.py`; the same shards as torchvision's parser, which extracts
them, then the folder path). Or torchvision's extracted folder (`meta.bin`, `train/`, `val/`); or
a tree `train/<class>/*`, `val/<class>/*` (sorted class folders give the indices; a folder's name
is its wnid and class); or, with `--splits train`, unlabelled images directly in `train/` (`cls`
-1, empty `wnid`, no classes).

Output: `OUT/{train,val}/imagenet-{train,val}-%06d.tar` (2,000 / 500 samples each, shuffled with
`--seed`) and `OUT/metadata.json`, which adds `shard_samples` (samples per `split/file name`) so a
reader can count what a truncated shard lost. A sample is `KEY.image.jpg` (the file's bytes, never
re-encoded) and `KEY.metadata.pyd` (pickled `{'cls': int, 'wnid': str}`). Shards are written under
a temporary name and renamed when complete, by `--workers` processes (the seeded shuffle fixes
each shard's content first, so the output does not depend on their number). A run stopped midway
and started again with the same arguments resumes: `OUT/<split>/.imagenet-<split>-plan.json`, kept
until the run ends, identifies the plan, and the complete shards whose sample counts match it are
kept. Images are copied, not decoded; `--verify` decodes every image first and writes nothing if
one fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import random
import sys
import tarfile
from pathlib import Path

from tqdm import tqdm

if __package__ in (None, ""):  # run as a script (the README's command): the repository, for data_loader
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing.imagenet_archives import ArchiveError, archives_present, index_archives  # noqa: E402

logger = logging.getLogger("create_tar_webdataset")

IMAGENET_FILES = ("meta.bin", "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
SPLITS = ("train", "val")
PARTIAL_SUFFIX = ".partial"


@dataclasses.dataclass(frozen=True)
class Record:
    """One image to write: its key, file, class index and wnid; for an image inside an archive,
    `path` is the archive and the bytes are `size` bytes at `offset`."""

    key: str
    path: str
    cls: int
    wnid: str
    offset: int = -1
    size: int = -1


@dataclasses.dataclass
class Source:
    """A dataset to shard: the metadata.json content and [(image path, class index)] per split;
    for archives, [(archive, offset, size)] per split beside them, the paths being where
    torchvision's extraction would put the files."""

    metadata: dict
    samples: dict[str, list[tuple[str, int]]]
    locations: dict[str, list[tuple[str, int, int]]] | None = None


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


def read_imagenet_archives(root: Path, splits: list[str], check_md5: bool = False) -> Source:
    """ImageNet's archives read in place (`imagenet_archives.index_archives`): the samples, classes
    and class names that `read_imagenet` gives after torchvision has extracted them."""
    index = index_archives(root, splits, md5=check_md5)
    first = index.wnids[splits[0]]
    for split in splits:
        if index.wnids[split] != first:
            raise ValueError(f"{root}: the {split} split has other classes than the {splits[0]} split")
    classes = [index.devkit.wnid_to_classes[wnid] for wnid in first]
    metadata = {  # as torchvision's ImageNet sets them
        "wnids": list(first),
        "classes": [list(names) for names in classes],
        "wnid_to_idx": {wnid: i for i, wnid in enumerate(first)},
        "class_to_idx": {name: i for i, names in enumerate(classes) for name in names},
    }
    wnid_to_idx = metadata["wnid_to_idx"]
    samples = {split: [(image.name, wnid_to_idx[image.wnid]) for image in images]
               for split, images in index.images.items()}
    locations = {split: [(image.archive, image.offset, image.size) for image in images]
                 for split, images in index.images.items()}
    logger.info("%s: indexed %s images in the archives, nothing extracted", root,
                {split: len(images) for split, images in samples.items()})
    return Source(metadata, samples, locations)


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


def read_source(root: Path, splits: list[str], check_md5: bool = False) -> Source:
    """The dataset at `root`: ImageNet's archives, read in place, unless the splits are extracted
    already; torchvision's extracted folder; otherwise an image-folder tree."""
    extracted = all((root / split).is_dir() for split in splits)
    if archives_present(root) and not extracted:
        logger.info("%s: ImageNet's archives found; reading them in place", root)
        return read_imagenet_archives(root, splits, check_md5)
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


def make_records(samples: list[tuple[str, int]], wnids: list[str], seed: int,
                 locations: list[tuple[str, int, int]] | None = None) -> list[Record]:
    """Records (keys from `sample_keys`) in a random order fixed by `seed`; with `locations`, each
    image's bytes lie in an archive."""
    keys = sample_keys([path for path, _ in samples])
    if locations is None:
        records = [Record(key, path, cls, wnids[cls] if cls >= 0 else "")  # unlabelled: -1
                   for key, (path, cls) in zip(keys, samples)]
    else:
        records = [Record(key, archive, cls, wnids[cls], offset, size)
                   for key, (_, cls), (archive, offset, size) in zip(keys, samples, locations)]
    random.Random(seed).shuffle(records)
    return records


class ImageReader:
    """An image's bytes: its file, or its bytes in an archive (kept open)."""

    def __init__(self):
        self.fds: dict[str, int] = {}

    def read(self, record: Record) -> bytes:
        if record.offset < 0:
            with open(record.path, "rb") as f:
                return f.read()
        fd = self.fds.get(record.path)
        if fd is None:
            fd = self.fds[record.path] = os.open(record.path, os.O_RDONLY)
        data = os.pread(fd, record.size, record.offset)
        if len(data) != record.size:
            raise ArchiveError(f"{record.path}: truncated: {record.key} needs bytes up to "
                               f"{record.offset + record.size:,}, the file ends earlier")
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def record_source(record: Record) -> str:
    return record.path if record.offset < 0 else f"{record.path} ({record.key}, {record.size} bytes at {record.offset})"


def verify_images(records: list[Record]) -> None:
    """Decode every image; raise naming the files that PIL cannot read."""
    from PIL import Image

    failed = []
    reader = ImageReader()
    try:
        for record in tqdm(records, desc="verify", unit="img"):
            try:
                with Image.open(io.BytesIO(reader.read(record))) as image:
                    image.load()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                if isinstance(err, ArchiveError):
                    raise
                failed.append(f"{record_source(record)} ({err})")
    finally:
        reader.close()
    if failed:
        raise ValueError(f"{len(failed)} undecodable image(s), nothing written: " + "; ".join(failed[:20]))


# ----------------------------------------------------------------------------- writing the shards


def write_samples(stream, samples) -> None:
    """The tar of `samples` [(key, image bytes, metadata bytes)], byte for byte what
    `webdataset.TarWriter(stream, encoder=False, mtime=0)` writes (tested), without importing it
    (and torch) in every writer process."""
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for key, image, meta in samples:
            for suffix, data in (("image.jpg", image), ("metadata.pyd", meta)):  # TarWriter sorts them
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
                tar.addfile(info, io.BytesIO(data))


def write_shard(records: list[Record], path: Path, progress=None, reader: ImageReader | None = None) -> int:
    """Write one shard through a temporary file renamed at the end; return the samples written.
    `progress` (a tqdm bar, or a shared counter) counts the images."""
    from utils.files import atomic_write

    reader = reader or ImageReader()

    def samples():
        for record in records:
            yield record.key, reader.read(record), pickle.dumps({"cls": record.cls, "wnid": record.wnid})
            if isinstance(progress, tqdm):
                progress.update(1)
            elif progress is not None:
                with progress.get_lock():
                    progress.value += 1

    with atomic_write(path, path.with_name(path.name + PARTIAL_SUFFIX)) as stream:
        write_samples(stream, samples())
    return len(records)


# a writer process's state, set by `start_writer`
_WORKER: dict = {}


def start_writer(counter) -> None:
    _WORKER.update(counter=counter, reader=ImageReader())


def write_shard_task(records: list[Record], path: str) -> tuple[str, int]:
    """`write_shard` in a writer process."""
    return path, write_shard(records, Path(path), _WORKER["counter"], _WORKER["reader"])


def shard_name(split: str, index: int) -> str:
    return f"imagenet-{split}-{index:06d}.tar"


def split_plan(records: list[Record], split: str, shard_size: int) -> dict:
    """What a run writes to a split: the shards' names and counts, and a digest of the samples in
    their order (key, class, wnid and, in an archive, size). A run started again resumes an
    interrupted run of the same plan only."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.key}\t{record.cls}\t{record.wnid}\t{record.size}\n".encode())
    shards = {shard_name(split, index): len(records[start:start + shard_size])
              for index, start in enumerate(range(0, len(records), shard_size))}
    return {"split": split, "samples": len(records), "shard_size": shard_size, "digest": digest.hexdigest(),
            "shards": shards}


def plan_path(folder: Path, split: str) -> Path:
    """Beside the split's folder, so that the folder holds shards only."""
    return folder.parent / f".imagenet-{split}-plan.json"


def shard_count(path: Path) -> int | None:
    """The samples in a shard (its headers read), None when it is not a readable tar."""
    try:
        with tarfile.open(path) as tar:
            return sum(1 for member in tar if member.name.endswith(".image.jpg"))
    except (tarfile.TarError, OSError, EOFError):
        return None


def prepare_split_folder(folder: Path, split: str, plan: dict, overwrite: bool) -> set[str]:
    """Make `folder` ready for `plan`; return the shards already complete. An earlier run's shards
    are removed with `overwrite`, kept when the plan file there is this plan's (an interrupted run
    of the same plan: the complete shards whose counts match are kept, the rest rewritten), and
    refused otherwise. The plan file is written here and removed by `finish_split`."""
    old = sorted(folder.glob(f"imagenet-{split}-*.tar"))
    partial = sorted(folder.glob(f"imagenet-{split}-*{PARTIAL_SUFFIX}"))
    try:
        earlier = json.loads(plan_path(folder, split).read_text())
    except (OSError, ValueError):
        earlier = None
    done: set[str] = set()
    if (old or partial) and not overwrite:
        if earlier != plan:
            raise FileExistsError(f"{folder} already holds {len(old) + len(partial)} shard file(s) "
                                  f"({(old + partial)[0].name}, ...) of a finished run or of other arguments; "
                                  "pass --overwrite to replace them")
        for path in old:
            if shard_count(path) == plan["shards"].get(path.name):
                done.add(path.name)
            else:
                logger.warning("%s: not the %s samples the plan gives it; writing it again", path,
                               plan["shards"].get(path.name))
        logger.info("%s: resuming an interrupted run: %d of %d shards complete", folder, len(done),
                    len(plan["shards"]))
    for path in old + partial:
        if path.name not in done:
            path.unlink()
    from utils.files import write_text_atomic

    write_text_atomic(plan_path(folder, split), json.dumps(plan))
    return done


def finish_split(folder: Path, split: str) -> None:
    """The split is written and metadata.json counts it: a later run no longer resumes it."""
    plan_path(folder, split).unlink(missing_ok=True)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def write_shards(tasks: list[tuple[list[Record], Path]], progress: tqdm, workers: int) -> None:
    """Write the shards of `tasks` in `workers` processes (in this one for 1)."""
    if workers <= 1 or len(tasks) <= 1:
        reader = ImageReader()
        try:
            for records, path in tasks:
                write_shard(records, path, progress, reader)
        finally:
            reader.close()
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    counter, start = context.Value("q", 0), progress.n
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context,
                                                initializer=start_writer, initargs=(counter,)) as pool:
        futures = [pool.submit(write_shard_task, records, str(path)) for records, path in tasks]
        try:
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.2,
                                                        return_when=concurrent.futures.FIRST_EXCEPTION)
                progress.update(start + counter.value - progress.n)
                for future in done:
                    future.result()  # raises a writer's error
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def write_split(records: list[Record], folder: Path, split: str, shard_size: int, overwrite: bool,
                workers: int = 1) -> dict[str, int]:
    """Write `records` as `folder/imagenet-{split}-%06d.tar` of `shard_size` samples in `workers`
    processes; return the samples in each shard, by `split/file name`."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = split_plan(records, split, shard_size)
    done = prepare_split_folder(folder, split, plan, overwrite)
    tasks = [(records[start:start + shard_size], folder / shard_name(split, index))
             for index, start in enumerate(range(0, len(records), shard_size))]
    todo = [(part, path) for part, path in tasks if path.name not in done]
    with tqdm(total=len(records), desc=f"{split} shards", unit="img") as progress:
        progress.update(sum(len(part) for part, path in tasks if path.name in done))
        write_shards(todo, progress, workers)
        progress.update(len(records) - progress.n)
    counts = {f"{split}/{name}": n for name, n in plan["shards"].items()}
    for name in plan["shards"]:
        if not (folder / name).is_file():
            raise RuntimeError(f"{folder / name}: not written")
    n_shards = len(tasks)
    logger.info("%s: %d samples in %d shards, %s", split, len(records), n_shards,
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
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes writing shards (default: the CPU cores, at most 8); the output is the same")
    parser.add_argument("--check-md5", action="store_true",
                        help="check ImageNet's archives' MD5 sums first (reads all 147 GB); without it, any "
                             "archives of ImageNet's layout are read")
    args = parser.parse_args(argv)
    if args.train_shard_size < 1 or args.val_shard_size < 1:
        parser.error("shard sizes must be positive")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Shard the dataset; return the number of samples written per split."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    source = read_source(args.input, args.splits, args.check_md5)
    shard_sizes = {"train": args.train_shard_size, "val": args.val_shard_size}
    plans = {split: make_records(source.samples[split], source.metadata["wnids"], args.seed,
                                 source.locations[split] if source.locations else None) for split in args.splits}
    empty = [split for split, records in plans.items() if not records]
    if empty:
        raise FileNotFoundError(f"{args.input}: no images in the split(s) {empty}")
    if args.verify:
        verify_images([record for records in plans.values() for record in records])
    counts, shard_samples = {}, {}
    for split, records in plans.items():
        written = write_split(records, args.output / split, split, shard_sizes[split], args.overwrite, args.workers)
        counts[split] = sum(written.values())
        shard_samples.update(written)
    write_metadata(source.metadata, shard_samples, args.output / "metadata.json")
    for split in plans:
        finish_split(args.output / split, split)
    logger.info("wrote %s and %s", args.output / "metadata.json", counts)
    return counts


if __name__ == "__main__":
    try:
        main()
    except ArchiveError as err:  # one line naming the file and member, no traceback
        sys.exit(f"create_tar_webdataset.py: error: {err}")

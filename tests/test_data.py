"""Data path (docs/reference.md §5): the shard writer, the augmentation recipes, and the shard and image-folder
loaders in one process and in two gloo processes, on small real image files.

Every test image is one solid colour, unique in the test set, so the mean colour of a `val` view
tells which image it came from: that is how "every evaluation sample exactly once" is checked.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import multiprocessing
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from data_loader.base import DataError, LoaderRuntime, batch_generator
from data_loader.decode import UndecodableImageError, decode_image
from data_loader.folder import UNLABELLED, ImageFolderLoader
from data_loader.recipes import MEAN, STD
from data_loader.transforms import (
    PackedFiles,
    PackedImages,
    RandomGaussianBlur,
    RandomSolarize,
    build_transform,
)
from data_loader.webdata import WebLoader, balanced_part
from preprocessing import create_tar_webdataset as shards_script
from utils.config import ConfigError, build_block, check_block
from utils.dist import free_port
from utils.registry import DATALOADERS

from .conftest import run_bench, signal_after_steps

GRAY = (55, 55, 55)  # off the colour grid below


# ----------------------------------------------------------------------------- test images


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    label: int
    colour: tuple[int, int, int] | None  # None: a corrupt file


def grid_colour(i: int) -> tuple[int, int, int]:
    """Colours 30 apart in at least one channel for i < 343."""
    return (40 + 30 * (i % 7), 40 + 30 * (i // 7 % 7), 40 + 30 * (i // 49 % 7))


def write_image(path: Path, kind: str, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    """A real image file: `rgb`, `cmyk` or `gray` JPEG, `png` (a PNG under a .JPEG name) or
    `truncated` (the first 60% of a noisy JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    if kind == "rgb":
        image.save(path, "JPEG", quality=95)
    elif kind == "cmyk":
        image.convert("CMYK").save(path, "JPEG", quality=95)
    elif kind == "gray":
        image.convert("L").save(path, "JPEG", quality=95)
    elif kind == "png":
        image.convert("RGBA").save(path, "PNG")
    elif kind == "truncated":
        noise = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, "JPEG", quality=90)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])
    else:
        raise ValueError(kind)


def make_tree(root: Path, layout: dict[str, dict[str, list[str]]], first_colour: int = 0) -> dict[str, list[Entry]]:
    """root/<split>/<class>/<class>_<i>.JPEG for layout {split: {class: [kind, ...]}}."""
    classes = sorted(layout["train"])
    entries: dict[str, list[Entry]] = {}
    i = first_colour
    for split, per_class in layout.items():
        entries[split] = []
        for name, kinds in per_class.items():
            for kind in kinds:
                colour = GRAY if kind == "gray" else (None if kind == "truncated" else grid_colour(i))
                key = f"{name}_{i:04d}"
                path = root / split / name / f"{key}.JPEG"
                write_image(path, kind, colour or (0, 0, 0), (40 + 7 * i % 41, 40 + 11 * i % 37))
                entries[split].append(Entry(key, path, classes.index(name), colour))
                i += 1
    return entries


def run_script(raw: Path, out: Path, *extra: str) -> dict[str, int]:
    return shards_script.main(["--input", str(raw), "--output", str(out), *extra])


def shard_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name[: -len(".image.jpg")] for m in tar.getmembers() if m.name.endswith(".image.jpg")]


def shard_pattern(folder: Path, split: str) -> str:
    n = len(list(folder.glob(f"imagenet-{split}-*.tar")))
    return f"{folder}/imagenet-{split}-{{000000..{n - 1:06d}}}.tar"


def view_colours(view: torch.Tensor) -> torch.Tensor:
    """`[b, 3, H, W]` normalised -> `[b, 3]` mean colour in 0..255."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((view * std + mean) * 255).mean(dim=(2, 3))


def identify(colours: torch.Tensor, entries: list[Entry]) -> list[str]:
    """The keys of the entries whose colours match `colours` `[n, 3]` (each within 6 levels)."""
    known = [e for e in entries if e.colour is not None]
    table = torch.tensor([e.colour for e in known], dtype=torch.float32)
    distance, index = torch.cdist(colours.float(), table).min(dim=1)
    assert bool((distance < 6).all()), f"colours {colours[distance >= 6].tolist()} match no test image"
    return [known[i].key for i in index.tolist()]


MAIN_LAYOUT = {
    "train": {"n001": ["rgb"] * 7 + ["cmyk"], "n002": ["rgb"] * 7 + ["gray"], "n003": ["rgb"] * 7 + ["png"]},
    "val": {"n001": ["rgb"] * 3, "n002": ["rgb"] * 4 + ["cmyk"], "n003": ["rgb"] * 5},
}
CORRUPT_LAYOUT = {
    "train": {"c1": ["rgb"] * 5, "c2": ["rgb"] * 2 + ["truncated"] + ["rgb"] * 3},
    "val": {"c1": ["rgb"] * 2, "c2": ["rgb", "truncated", "rgb"]},
}


@dataclasses.dataclass
class Data:
    raw: Path
    out: Path
    entries: dict[str, list[Entry]]

    def pattern(self, split: str) -> str:
        return shard_pattern(self.out / split, split)

    def by_key(self, split: str) -> dict[str, Entry]:
        return {e.key: e for e in self.entries[split]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    """24 train images in 6 shards of 4, 13 val images in 5 shards of 3 (the last holding 1)."""
    root = tmp_path_factory.mktemp("main")
    entries = make_tree(root / "raw", MAIN_LAYOUT)
    run_script(root / "raw", root / "out", "--train-shard-size", "4", "--val-shard-size", "3")
    return Data(root / "raw", root / "out", entries)


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> Data:
    """A truncated JPEG in each split: 11 train images (4 shards of 3), 5 val images (2 shards)."""
    root = tmp_path_factory.mktemp("corrupt")
    entries = make_tree(root / "raw", CORRUPT_LAYOUT, first_colour=100)
    run_script(root / "raw", root / "out", "--train-shard-size", "3", "--val-shard-size", "3")
    return Data(root / "raw", root / "out", entries)


# ----------------------------------------------------------------------------- the shard writer


def test_shards_layout_and_metadata(data):
    train = sorted(p.name for p in (data.out / "train").iterdir())
    val = sorted(p.name for p in (data.out / "val").iterdir())
    assert train == [f"imagenet-train-{i:06d}.tar" for i in range(6)]
    assert val == [f"imagenet-val-{i:06d}.tar" for i in range(5)]
    assert [len(shard_keys(data.out / "val" / name)) for name in val] == [3, 3, 3, 3, 1]
    assert all(len(shard_keys(data.out / "train" / name)) == 4 for name in train)
    metadata = json.loads((data.out / "metadata.json").read_text())
    assert metadata == {
        "wnids": ["n001", "n002", "n003"],
        "classes": ["n001", "n002", "n003"],
        "wnid_to_idx": {"n001": 0, "n002": 1, "n003": 2},
        "class_to_idx": {"n001": 0, "n002": 1, "n003": 2},
        "shard_samples": {**{f"train/{name}": 4 for name in train},
                          **{f"val/{name}": n for name, n in zip(val, [3, 3, 3, 3, 1])}},
    }


@pytest.mark.parametrize("split", ["train", "val"])
def test_shard_samples_hold_the_original_bytes(data, split):
    by_key = data.by_key(split)
    seen = []
    for shard in sorted((data.out / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = shard_keys(shard)
        assert sorted(members) == sorted([f"{k}.image.jpg" for k in keys] + [f"{k}.metadata.pyd" for k in keys])
        for key in keys:
            entry = by_key[key]
            assert members[f"{key}.image.jpg"] == entry.path.read_bytes()
            meta = pickle.loads(members[f"{key}.metadata.pyd"])
            assert meta == {"cls": entry.label, "wnid": entry.path.parent.name}
        seen += keys
    assert sorted(seen) == sorted(by_key)


def test_shards_are_shuffled_with_a_fixed_seed(data, tmp_path):
    written = [k for shard in sorted((data.out / "train").glob("*.tar")) for k in shard_keys(shard)]
    assert written != sorted(written)
    run_script(data.raw, tmp_path / "same", "--train-shard-size", "4", "--val-shard-size", "3")
    run_script(data.raw, tmp_path / "other", "--train-shard-size", "4", "--val-shard-size", "3", "--seed", "1")
    for name in ("imagenet-train-000000.tar", "imagenet-train-000005.tar"):
        assert (tmp_path / "same" / "train" / name).read_bytes() == (data.out / "train" / name).read_bytes()
    other = [k for shard in sorted((tmp_path / "other" / "train").glob("*.tar")) for k in shard_keys(shard)]
    assert other != written and sorted(other) == sorted(written)


def test_torchvision_imagenet_layout(tmp_path):
    """A folder parsed by torchvision's ImageNet (meta.bin beside train/ and val/): wnids and class
    names come from its meta."""
    layout = {"train": {"n01440764": ["rgb"] * 2, "n01443537": ["rgb"] * 3}, "val": {"n01440764": ["rgb"],
                                                                                     "n01443537": ["rgb"]}}
    entries = make_tree(tmp_path / "in", layout)
    names = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus")}
    torch.save((names, ["n01440764", "n01443537"]), tmp_path / "in" / "meta.bin")
    assert run_script(tmp_path / "in", tmp_path / "out") == {"train": 5, "val": 2}
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["wnids"] == ["n01440764", "n01443537"]
    assert metadata["classes"] == [["tench", "Tinca tinca"], ["goldfish", "Carassius auratus"]]
    assert metadata["class_to_idx"]["Carassius auratus"] == 1 and metadata["wnid_to_idx"]["n01440764"] == 0
    keys = shard_keys(tmp_path / "out" / "val" / "imagenet-val-000000.tar")
    assert sorted(keys) == sorted(e.key for e in entries["val"])


@pytest.mark.slow
def test_writer_runs_as_the_readme_command(tmp_path):
    """`python preprocessing/create_tar_webdataset.py --input ... --output ...` as the seed README says."""
    entries = make_tree(tmp_path / "in", {"train": {"a": ["rgb"] * 3}, "val": {"a": ["rgb"]}})
    script = Path(shards_script.__file__)
    subprocess.run([sys.executable, str(script), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                   check=True, capture_output=True, cwd=script.parent.parent)
    assert sorted(shard_keys(tmp_path / "out" / "train" / "imagenet-train-000000.tar")) == [e.key for e in
                                                                                            entries["train"]]


def test_writer_keys_repeated_or_dotted_names_by_class(tmp_path):
    """File names that repeat across class folders, or hold dots, are keyed `<class>_<name>`; keys
    that would still repeat are refused."""
    for name in ("a", "b"):
        write_image(tmp_path / "dup" / "train" / name / "img.jpg", "rgb", (1, 2, 3), (40, 40))
    write_image(tmp_path / "dup" / "train" / "a" / "x.y.jpg", "rgb", (1, 2, 3), (40, 40))
    assert run_script(tmp_path / "dup", tmp_path / "o1", "--splits", "train") == {"train": 3}
    assert sorted(shard_keys(tmp_path / "o1" / "train" / "imagenet-train-000000.tar")) == ["a_img", "a_x_y", "b_img"]
    write_image(tmp_path / "clash" / "train" / "a_b" / "c.jpg", "rgb", (1, 2, 3), (40, 40))
    write_image(tmp_path / "clash" / "train" / "a" / "b_c.jpg", "rgb", (1, 2, 3), (40, 40))
    write_image(tmp_path / "clash" / "train" / "a" / "c.jpg", "rgb", (1, 2, 3), (40, 40))
    with pytest.raises(ValueError, match="same key 'a_b_c'"):
        run_script(tmp_path / "clash", tmp_path / "o2", "--splits", "train")


def test_writer_refuses_bad_inputs(tmp_path):
    write_image(tmp_path / "dots" / "train" / "a" / "x.y.jpg", "rgb", (1, 2, 3), (40, 40))
    with pytest.raises(FileNotFoundError, match="val"):
        run_script(tmp_path / "dots", tmp_path / "o3")
    with pytest.raises(FileNotFoundError, match="neither"):
        run_script(tmp_path / "nothing", tmp_path / "o4")


def test_writer_verify_names_the_truncated_file(corrupt, tmp_path):
    with pytest.raises(ValueError, match=r"2 undecodable.*c2_0107\.JPEG"):
        run_script(corrupt.raw, tmp_path / "out", "--verify")
    assert not (tmp_path / "out").exists()


def test_writer_keeps_earlier_shards_unless_overwrite(data, tmp_path):
    run_script(data.raw, tmp_path, "--splits", "val")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_script(data.raw, tmp_path, "--splits", "val")
    assert run_script(data.raw, tmp_path, "--splits", "val", "--val-shard-size", "100", "--overwrite") == {"val": 13}
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["imagenet-val-000000.tar"]
    # the shard counts of metadata.json follow: the rewritten split's replaced, another split's kept
    run_script(data.raw, tmp_path, "--splits", "train", "--train-shard-size", "24")
    assert json.loads((tmp_path / "metadata.json").read_text())["shard_samples"] == {
        "val/imagenet-val-000000.tar": 13, "train/imagenet-train-000000.tar": 24}


def test_interrupted_writer_leaves_no_partial_shard(data, tmp_path):
    records = shards_script.make_records([(str(e.path), e.label) for e in data.entries["val"]], ["a", "b", "c"], 0)
    records[7] = dataclasses.replace(records[7], path=str(tmp_path / "vanished.JPEG"))
    with pytest.raises(FileNotFoundError, match="vanished"):
        shards_script.write_split(records, tmp_path / "val", "val", 3, overwrite=False)
    left = sorted(p.name for p in (tmp_path / "val").iterdir())
    assert left == ["imagenet-val-000000.tar", "imagenet-val-000001.tar"]


# ----------------------------------------------------------------------------- recipes and decoding


@pytest.mark.parametrize(
    ("recipe", "n_augs", "sizes"),
    [
        ("val", 1, [224]),
        ("val_bicubic_inter", 1, [224]),
        ("linear_prob", 1, [224]),
        ("simclr", 3, [224] * 3),
        ("dino", 2, [224] * 2),
        ("dino", 3, [224] * 3),
        ("dino", 4, [224] * 4),
        ("dino_multicrop", 8, [224] * 2 + [96] * 6),
    ],
)
def test_recipe_views(recipe, n_augs, sizes):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    views = build_transform(recipe, n_augs)(image)
    assert [tuple(v.shape) for v in views] == [(3, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_dino_view_patterns():
    """3 views are [1, 2, 1], 4 views [1, 2, 1, 2]; multi-crop is the two global views + 6 local."""
    three, four, multi = build_transform("dino", 3), build_transform("dino", 4), build_transform("dino_multicrop", 8)
    assert three.views[2] is three.views[0] and three.views[1] is not three.views[0]
    assert four.views[2] is four.views[0] and four.views[3] is four.views[1]
    assert "RandomSolarize" in repr(four.views[1]) and "RandomSolarize" not in repr(four.views[0])
    assert "p=1.0" in repr(four.views[0]) and "p=0.1" in repr(four.views[1])
    assert [v.transforms[0].size for v in multi.views] == [(224, 224)] * 2 + [(96, 96)] * 6
    assert multi.views[2].transforms[0].scale == (0.05, 0.14) and multi.views[0].transforms[0].scale == (0.14, 1.0)


@pytest.mark.parametrize(
    ("recipe", "n_augs"),
    [("val", 2), ("val_bicubic_inter", 0), ("linear_prob", 2), ("simclr", 0), ("dino", 1), ("dino", 5),
     ("dino_multicrop", 2)],
)
def test_recipe_rejects_a_view_count_it_does_not_make(recipe, n_augs):
    with pytest.raises(ConfigError, match=f"n_augs.*'{recipe}'.*n_augs={n_augs}"):
        build_transform(recipe, n_augs)


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="'mocov3'.*dino_multicrop"):
        build_transform("mocov3", 2)


def test_blur_and_solarisation():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    pixels = np.asarray(noise, dtype=float)
    blurred = np.asarray(RandomGaussianBlur(p=1.0, radius_min=2.0, radius_max=2.0)(noise), dtype=float)
    assert blurred.std() < pixels.std() / 2
    assert RandomGaussianBlur(p=0.0)(noise) is noise and RandomSolarize(p=0.0)(noise) is noise
    solarised = np.asarray(RandomSolarize(p=1.0)(noise), dtype=float)
    assert np.array_equal(solarised, np.where(pixels >= 128, 255 - pixels, pixels))


@pytest.mark.parametrize("kind", ["rgb", "cmyk", "gray", "png"])
def test_decode_gives_rgb(tmp_path, kind):
    path = tmp_path / "x.JPEG"
    colour = GRAY if kind == "gray" else (100, 160, 220)
    write_image(path, kind, colour, (45, 61))
    image = decode_image(path.read_bytes(), str(path))
    assert image.mode == "RGB" and image.size == (45, 61)
    assert np.abs(np.asarray(image, dtype=float).reshape(-1, 3).mean(0) - colour).max() < 3


def test_decode_names_a_truncated_file(tmp_path):
    write_image(tmp_path / "bad.JPEG", "truncated", (0, 0, 0), (64, 64))
    with pytest.raises(UndecodableImageError, match="bad.JPEG.*truncated"):
        decode_image((tmp_path / "bad.JPEG").read_bytes(), "bad.JPEG")


# ----------------------------------------------------------------------------- shard loader, one process


def web(pattern: str, dataset_size: int, shuffle: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
        **kw) -> WebLoader:
    return WebLoader(LoaderRuntime(rank, world, seed), pattern, dataset_size, shuffle, batch_size, **kw)


def test_reference_config_blocks_build_without_data(tmp_path):
    """The loader blocks of the paper's configs validate and build (a dry run) with no data present."""
    web_args = {"shards": str(tmp_path / "train/imagenet-train-{000000..000639}.tar"), "dataset_size": 1280000,
                "shuffle": 10000, "num_workers": 16, "batch_size": 1024, "transform_type": "dino", "n_augs": 2}
    folder_args = {"root": str(tmp_path / "original"), "shuffle": False, "num_workers": 16, "batch_size": 512,
                   "train": False}
    for kind, args in (("web_dataloader", web_args), ("image_folder_dataloader", folder_args)):
        block = {"type": kind, "args": args}
        check_block(block, DATALOADERS, "train_dataloader")
        loader = build_block(block, DATALOADERS, runtime=LoaderRuntime(rank=3, world_size=8))
        assert (loader.global_batch_size, loader.batch_size) == (args["batch_size"], args["batch_size"] // 8)
    assert len(build_block({"type": "web_dataloader", "args": web_args}, DATALOADERS, runtime=LoaderRuntime())) == 1250
    val = web(str(tmp_path / "val/imagenet-val-{000000..000099}.tar"), 50000, 0, 4096, rank=7, world=8)
    assert len(val) == 13 and val.num_samples == 50000  # 12 or 13 shards of 500 per process, 512 a batch
    with pytest.raises(ConfigError, match="n_augs.*'val'"):
        build_block({"type": "web_dataloader", "args": {**web_args, "transform_type": "val"}}, DATALOADERS,
                    runtime=LoaderRuntime())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_web_evaluation_reads_every_sample_once(data, num_workers):
    loader = web(data.pattern("val"), 13, 0, 4, train=False, num_workers=num_workers)
    keys, labels = [], []
    for views, target in loader:
        assert len(views) == 1 and views[0].shape[1:] == (3, 224, 224) and 1 <= len(target) <= 4
        assert target.dtype == torch.int64
        keys += identify(view_colours(views[0]), data.entries["val"])
        labels += target.tolist()
    assert sorted(keys) == sorted(data.by_key("val"))
    assert labels == [data.by_key("val")[k].label for k in keys]
    if num_workers == 0:  # one reader: the shards' own order
        assert keys == [k for s in sorted((data.out / "val").glob("*.tar")) for k in shard_keys(s)]


def test_web_evaluation_of_the_train_shards_with_train_true_and_no_shuffle(data):
    """eval_knn.yaml's bank: `train: true, shuffle: 0` reads every sample once, the last batch short."""
    loader = web(data.pattern("train"), 24, 0, 10, train=True, num_workers=0)
    batches = list(loader)
    assert [len(t) for _, t in batches] == [10, 10, 4] and len(loader) == 3
    keys = [k for views, _ in batches for k in identify(view_colours(views[0]), data.entries["train"])]
    assert sorted(keys) == sorted(data.by_key("train"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_web_training_batches(data, num_workers):
    loader = web(data.pattern("train"), 24, 5, 8, transform_type="dino", n_augs=2, num_workers=num_workers)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for views, target in batches:
        assert [tuple(v.shape) for v in views] == [(8, 3, 224, 224)] * 2
        assert target.dtype == torch.int64 and set(target.tolist()) <= {0, 1, 2}


def test_web_multicrop_batches(data):
    loader = web(data.pattern("train"), 8, 3, 4, transform_type="dino_multicrop", n_augs=8, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    views, target = batches[0]
    assert [tuple(v.shape) for v in views] == [(4, 3, 224, 224)] * 2 + [(4, 3, 96, 96)] * 6 and len(target) == 4


def test_web_training_epochs(data):
    """An epoch's order is fixed by (seed, epoch); with a one-sample buffer (no mixing across the
    stream's passes) one reader reads every sample once an epoch, the shards in a new order."""

    def epoch_keys(epoch: int, num_workers: int, shuffle: int = 6) -> list[str]:
        loader = web(data.pattern("train"), 24, shuffle, 6, seed=3, num_workers=num_workers)
        loader.set_epoch(epoch)
        return [k for views, _ in loader for k in identify(view_colours(views[0]), data.entries["train"])]

    first = epoch_keys(0, 1)
    assert epoch_keys(0, 1) == first and epoch_keys(1, 1) != first
    assert epoch_keys(2, 2) == epoch_keys(2, 2) != epoch_keys(3, 2)
    fifo = [epoch_keys(e, 1, shuffle=1) for e in (0, 1)]
    assert sorted(fifo[0]) == sorted(fifo[1]) == sorted(data.by_key("train")) and fifo[0] != fifo[1]


def test_web_training_skips_and_counts_a_corrupt_image(corrupt, warnings_of_groco):
    """15 samples a epoch out of 10 decodable ones: the stream reads the corrupt one at least once."""
    loader = web(corrupt.pattern("train"), 15, 4, 5, num_workers=0)
    batches = list(loader)
    assert [len(t) for _, t in batches] == [5, 5, 5]
    keys = [k for views, _ in batches for k in identify(view_colours(views[0]), corrupt.entries["train"])]
    assert set(keys) == {e.key for e in corrupt.entries["train"] if e.colour is not None}
    records = [r.getMessage() for r in warnings_of_groco.records if "undecodable" in r.getMessage()]
    assert records and "(1 skipped" in records[0] and "imagenet-train-" in records[0] and "key c2_0107" in records[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_web_evaluation_stops_at_a_corrupt_image(corrupt, num_workers):
    loader = web(corrupt.pattern("val"), 5, 0, 2, train=False, num_workers=num_workers)
    with pytest.raises(UndecodableImageError, match=r"shard \S+imagenet-val-00000[01]\.tar, key c2_0114"):
        list(loader)


def test_web_loader_refusals(data):
    with pytest.raises(ConfigError, match="batch_size: 10.*3 processes"):
        web(data.pattern("train"), 24, 5, 10, world=3)
    with pytest.raises(ConfigError, match="6 shards.*2 processes x 4 workers"):
        web(data.pattern("train"), 24, 5, 8, world=2, num_workers=4)
    with pytest.raises(ConfigError, match="no training step"):
        web(data.pattern("train"), 6, 5, 8)
    web(data.pattern("val"), 13, 0, 8, world=2, num_workers=4, train=False)  # evaluation: fine


def test_balanced_part_covers_every_item_once():
    for n in range(0, 12):
        for world in range(1, 5):
            parts = [balanced_part(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ----------------------------------------------------------------------------- image-folder loader, one process


def folder(root: Path, shuffle: bool, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
           **kw) -> ImageFolderLoader:
    return ImageFolderLoader(LoaderRuntime(rank, world, seed), str(root), shuffle, batch_size, **kw)


def test_folder_loader_scans_lazily(tmp_path):
    loader = folder(tmp_path / "absent", True, 8, transform_type="dino", n_augs=2)
    assert loader.batch_size == 8
    with pytest.raises(DataError, match="root: .*absent/train: no such folder"):
        len(loader)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_evaluation_in_dataset_order(data, num_workers):
    loader = folder(data.raw, False, 5, train=False, num_workers=num_workers)
    batches = list(loader)
    assert [len(t) for _, t in batches] == [5, 5, 3] and len(loader) == 3
    keys = [k for views, _ in batches for k in identify(view_colours(views[0]), data.entries["val"])]
    assert keys == sorted(data.by_key("val"))  # class folders then file names, all sorted
    assert [t for _, target in batches for t in target.tolist()] == [data.by_key("val")[k].label for k in keys]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_training_epochs(data, num_workers):
    def epoch(e: int) -> tuple[list[str], list[list[tuple[int, ...]]]]:
        loader = folder(data.raw, True, 10, seed=1, num_workers=num_workers)
        loader.set_epoch(e)
        batches = list(loader)
        keys = [k for views, _ in batches for k in identify(view_colours(views[0]), data.entries["train"])]
        return keys, [[tuple(v.shape) for v in views] for views, _ in batches]

    keys, shapes = epoch(0)
    assert shapes == [[(10, 3, 224, 224)]] * 2 and len(set(keys)) == 20
    assert epoch(0)[0] == keys and epoch(1)[0] != keys


def test_folder_training_multicrop(data):
    loader = folder(data.raw, True, 6, transform_type="dino_multicrop", n_augs=8, num_workers=2)
    views, target = next(iter(loader))
    assert [tuple(v.shape) for v in views] == [(6, 3, 224, 224)] * 2 + [(6, 3, 96, 96)] * 6 and len(target) == 6


def test_folder_of_unlabelled_images_trains_but_feeds_no_evaluator(tmp_path):
    """Images directly in root/train (no class folders): training batches with labels -1, every
    image once per epoch; an evaluator's loader on them is refused by name."""
    for i in range(20):
        write_image(tmp_path / "own" / "train" / f"photo_{i:02d}.jpg", "rgb", grid_colour(i), (48, 40))
    (tmp_path / "own" / "train" / "notes.txt").write_text("not an image")
    (tmp_path / "own" / "train" / ".ipynb_checkpoints").mkdir()
    loader = folder(tmp_path / "own", True, 10, transform_type="val")
    loader.check_data()
    batches = list(loader)
    assert len(batches) == 2 and all(labels.tolist() == [UNLABELLED] * 10 for _, labels in batches)
    colours = {tuple(int(c) for c in colour) for views, _ in batches for colour in view_colours(views[0])}
    assert len(colours) == 20
    with pytest.raises(DataError, match=r"own/train: the images are not in class folders \(unlabelled\); the "
                                        r"evaluators need classes"):
        folder(tmp_path / "own", False, 10, train=True).check_data(num_classes=1000)
    (tmp_path / "own" / "val").mkdir()
    with pytest.raises(DataError, match="not in class folders .* no classes to read .*own/val by"):
        len(folder(tmp_path / "own", False, 10, train=False))


def test_unlabelled_images_as_shards(data, tmp_path):
    """Loose images in train/ shard with `--splits train` alone: class -1, no classes in
    metadata.json. The shard loader trains on them with labels -1; an evaluator's loader on them,
    or one of fewer classes than labelled shards list, is refused."""
    for i in range(12):
        write_image(tmp_path / "own" / "train" / f"photo_{i:02d}.jpg", "rgb", grid_colour(i), (48, 40))
    with pytest.raises(ValueError, match="own/train: images without class folders .* pass --splits train"):
        run_script(tmp_path / "own", tmp_path / "out")
    assert run_script(tmp_path / "own", tmp_path / "out", "--splits", "train", "--train-shard-size", "4") == {
        "train": 12}
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["classes"] == []
    loader = web(shard_pattern(tmp_path / "out" / "train", "train"), 12, 4, 6,
                 transform_type="val")
    loader.check_data()
    batches = list(loader)
    assert len(batches) == 2 and all(labels.tolist() == [-1] * 6 for _, labels in batches)
    with pytest.raises(DataError, match="metadata.json lists no classes \\(unlabelled images\\)"):
        loader.check_data(num_classes=1000)
    for other in ("{}", "not JSON", "[1, 2]"):  # another writer's file: the labels are checked when read
        (tmp_path / "out" / "metadata.json").write_text(other)
        loader.check_data(num_classes=1000)
    with pytest.raises(DataError, match="num_classes: 2, but .*metadata.json lists 3 classes"):
        web(data.pattern("val"), 13, 0, 4, train=False).check_data(num_classes=2)
    web(data.pattern("val"), 13, 0, 4, train=False).check_data(num_classes=3)


def test_hidden_entries_are_neither_classes_nor_images(tmp_path):
    """A Jupyter checkpoint folder is no class (it would shift every label) and macOS's `._name`
    companions are no images, for the loader and the shard writer alike; loose images beside class
    folders are refused by both."""
    for name, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0))):
        for split in ("train", "val"):
            write_image(tmp_path / "tree" / split / name / f"{name}.jpg", "rgb", colour, (32, 32))
    (tmp_path / "tree" / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "tree" / "train" / "._stray.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "tree" / "train" / "b" / "._b.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    loader = folder(tmp_path / "tree", False, 4, train=False)
    loader.check_data(num_classes=2)
    assert [(Path(p).name, label) for p, label in loader.samples] == [("a.jpg", 0), ("b.jpg", 1)]
    assert [(Path(p).name, c) for p, c in folder(tmp_path / "tree", True, 2).samples] == [("a.jpg", 0), ("b.jpg", 1)]
    assert run_script(tmp_path / "tree", tmp_path / "out") == {"train": 2, "val": 2}
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["classes"] == ["a", "b"]

    write_image(tmp_path / "tree" / "train" / "loose.jpg", "rgb", (0, 0, 200), (32, 32))
    with pytest.raises(ValueError, match=r"tree/train holds 2 class folders and 1 image files outside them"):
        run_script(tmp_path / "tree", tmp_path / "out2")
    with pytest.raises(DataError, match=r"tree/train holds 2 class folders and 1 image files outside them"):
        len(folder(tmp_path / "tree", True, 2))


def test_folder_errors_name_the_problem(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="empty/train: no class folders and no image files"):
        len(folder(tmp_path / "empty", True, 4))
    write_image(tmp_path / "mixed" / "train" / "cat" / "a.jpg", "rgb", (200, 0, 0), (32, 32))
    write_image(tmp_path / "mixed" / "train" / "stray.jpg", "rgb", (0, 200, 0), (32, 32))
    with pytest.raises(DataError, match=r"mixed/train holds 1 class folders and 1 image files outside them "
                                        r"\(stray.jpg, ...\)"):
        len(folder(tmp_path / "mixed", True, 1))
    write_image(tmp_path / "flat_val" / "train" / "cat" / "a.jpg", "rgb", (200, 0, 0), (32, 32))
    write_image(tmp_path / "flat_val" / "val" / "b.jpg", "rgb", (200, 0, 0), (32, 32))
    with pytest.raises(DataError, match="flat_val/val: no image files .* in its class folders"):
        len(folder(tmp_path / "flat_val", False, 1, train=False))


def test_train_on_own_unlabelled_images_with_the_example_config(tmp_path, capsys):
    """configs/examples/own_images.yaml on a folder of loose JPEGs (a small model for the test);
    the same folder given to the k-NN evaluator stops before a run folder is made."""
    import train

    for i in range(24):
        write_image(tmp_path / "own" / "train" / f"img{i}.jpg", "rgb", grid_colour(i), (64, 48))
    argv = ["--config", str(Path(__file__).parents[1] / "configs" / "examples" / "own_images.yaml"), "--device",
            "cpu", f"train_dataloader.args.root={tmp_path / 'own'}", "train_dataloader.args.batch_size=12",
            "train_dataloader.args.num_workers=1", "encoder.args.arch=resnet10", "encoder.args.width=8",
            "projection.args.num_layers=2", "projection.args.output_dim=32", "loss.args.topk_neg=5",
            "trainer.epochs=1", "trainer.log_step=1", "seed=0", f"save_dir={tmp_path / 'out'}"]
    assert train.main(argv) == 0
    run = next((tmp_path / "out" / "models" / "own_images").iterdir())
    steps = [json.loads(line) for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert [s["step"] for s in steps] == [0, 1] and all(np.isfinite(s["loss"]) for s in steps)
    assert (run / "latest_model.pth").is_file()

    knn = ("evaluator=[{type: KNNEvaluator, args: {k: [3], num_classes: 1, temperature: 0.07, "
           "apply_evaluator_per_epoch: 1}}]")
    loaders = (f"valid_dataloader=[{{type: image_folder_dataloader, args: {{root: {tmp_path / 'own'}, "
               f"shuffle: false, batch_size: 8, train: true}}}}, {{type: image_folder_dataloader, args: "
               f"{{root: {tmp_path / 'own'}, shuffle: false, batch_size: 8, train: false}}}}]")
    capsys.readouterr()
    assert train.main([*argv[:-1], knn, loaders, f"save_dir={tmp_path / 'refused'}"]) == 2
    assert "the images are not in class folders (unlabelled); the evaluators need classes" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_folder_training_refills_a_batch_with_a_corrupt_image(corrupt, warnings_of_groco):
    loader = folder(corrupt.raw, True, 11)
    [(views, target)] = list(loader)
    assert views[0].shape[0] == len(target) == 11
    keys = identify(view_colours(views[0]), corrupt.entries["train"])
    assert set(keys) == {e.key for e in corrupt.entries["train"] if e.colour is not None}
    [record] = [r for r in warnings_of_groco.records if "undecodable" in r.getMessage()]
    assert "c2_0107.JPEG" in record.getMessage() and "1 skipped" in record.getMessage()


def test_folder_evaluation_stops_at_a_corrupt_image(corrupt):
    """(The error's way out of a worker process is the same as in the shard loader's test.)"""
    with pytest.raises(UndecodableImageError, match=r"c2_0114\.JPEG"):
        list(folder(corrupt.raw, False, 2, train=False))


# ----------------------------------------------------------------------------- two gloo processes


def train_pass(loader) -> dict:
    """Iterate a training loader with a collective every step (as DDP has): a process with more
    steps than the other would wait here until the gloo timeout."""
    shapes = []
    for views, target in loader:
        dist.all_reduce(torch.ones(1))
        shapes.append([tuple(v.shape) for v in views] + [tuple(target.shape)])
    steps = torch.tensor([len(shapes)])
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    return {"shapes": shapes, "len": len(loader), "max_steps": int(steps)}


def eval_pass(loader) -> dict:
    colours, labels = [], []
    for views, target in loader:
        colours.append(view_colours(views[0]))
        labels += target.tolist()
    return {"colours": torch.cat(colours) if colours else torch.zeros(0, 3), "labels": labels}


def distributed_worker(rank: int, world: int, port: int, out: str, raw: str, train: str, val: str) -> None:
    # A process started by torchrun forks its DataLoader workers (Linux's default); one started by
    # mp.spawn would spawn them, re-importing torch in each (seconds apiece). One thread: a forked
    # process must not run OpenMP threads its parent may have run (it can hang).
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    runtime = LoaderRuntime(rank, world, seed=5)
    result = {
        "web_val": eval_pass(WebLoader(runtime, val, 13, 0, 4, num_workers=1, train=False)),
        "web_train": train_pass(WebLoader(runtime, train, 24, 6, 8, num_workers=2, transform_type="dino", n_augs=2)),
        "folder_val": eval_pass(ImageFolderLoader(runtime, raw, False, 4, num_workers=2, train=False)),
        "folder_train": train_pass(ImageFolderLoader(runtime, raw, True, 6, num_workers=0, transform_type="simclr",
                                                     n_augs=3)),
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    args = (2, free_port(), str(out), str(data.raw), data.pattern("train"), data.pattern("val"))
    # forked, where the platform can: a spawned process imports torch, torchvision and this module again (~7 s each)
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(distributed_worker, args=args, nprocs=2, join=True, start_method=start_method)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_two_processes_web_evaluation(data, two_processes):
    """5 val shards over 2 processes: rank 0 reads shards 0-1, rank 1 shards 2-4; gathered in rank
    order they give every sample once, in the shards' order."""
    keys = [identify(r["web_val"]["colours"], data.entries["val"]) for r in two_processes]
    shards = sorted((data.out / "val").glob("*.tar"))
    assert keys[0] == [k for s in shards[:2] for k in shard_keys(s)]
    assert keys[1] == [k for s in shards[2:] for k in shard_keys(s)]
    assert [r["web_val"]["labels"] for r in two_processes] == [[data.by_key("val")[k].label for k in ks] for ks in keys]


@pytest.mark.slow
def test_two_processes_web_training(two_processes):
    for r in two_processes:
        assert r["web_train"]["len"] == r["web_train"]["max_steps"] == len(r["web_train"]["shapes"]) == 3
        assert r["web_train"]["shapes"] == [[(4, 3, 224, 224), (4, 3, 224, 224), (4,)]] * 3


@pytest.mark.slow
def test_two_processes_folder_evaluation(data, two_processes):
    keys = [identify(r["folder_val"]["colours"], data.entries["val"]) for r in two_processes]
    assert keys[0] + keys[1] == sorted(data.by_key("val")) and len(keys[0]) == 7


@pytest.mark.slow
def test_two_processes_folder_training(two_processes):
    for r in two_processes:
        assert r["folder_train"]["len"] == r["folder_train"]["max_steps"] == 4
        assert r["folder_train"]["shapes"] == [[(3, 3, 224, 224)] * 3 + [(3,)]] * 4


# ----------------------------------------------------------------------------- train.py on real data


def small_config(train_block: dict, bank_block: dict, val_block: dict, save_dir: Path) -> dict:
    """A tiny ResNet-10 (width 8, conftest's TINY model) trained for one epoch with GroCo and evaluated by k-NN."""
    return {
        "train_dataloader": train_block,
        "valid_dataloader": [bank_block, val_block],
        "encoder": {"type": "RegularEncoder", "args": {"arch": "resnet10", "width": 8}},
        "projection": {"type": "RegularProjection", "args": {"num_layers": 2, "output_dim": 32}},
        "loss": {"type": "GroCo", "args": {"n_augs": 2, "topk_neg": 5}},
        "base_learning_rate": 0.1,
        "warmup_epochs": 0,
        "optimizer": {"type": "SGD", "args": {"momentum": 0.9, "weight_decay": 1.0e-6}},
        "trainer": {"epochs": 1, "init_val": True, "log_step": 1},
        "seed": 0,
        "save_dir": str(save_dir),
        "evaluator": [{"type": "KNNEvaluator", "args": {"k": [3], "num_classes": 3, "log_name": "_online"}}],
    }


def run_one_epoch(config: dict, tmp_path: Path, name: str) -> tuple[dict, list[dict]]:
    import train

    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    results = tmp_path / "results.json"
    assert train.main(["--config", str(path), "--device", "cpu", "--results-json", str(results)]) == 0
    run = next((tmp_path / "models" / name).iterdir())
    steps = [json.loads(line) for line in open(run / "metrics.jsonl") if '"loss"' in line]
    return json.loads(results.read_text()), steps


def shard_blocks(data: Data, **train_args) -> tuple[dict, dict, dict]:
    """web_dataloader blocks on the test shards: training (global batch 12, dino x 2, `train_args`
    added), the k-NN bank (the 24 training images) and the queries (the 13 val images)."""
    train = {"type": "web_dataloader", "args": {"shards": data.pattern("train"), "dataset_size": 24, "shuffle": 8,
                                                "batch_size": 12, "transform_type": "dino", "n_augs": 2,
                                                **train_args}}
    bank = {"type": "web_dataloader", "args": {"shards": data.pattern("train"), "dataset_size": 24, "shuffle": 0,
                                               "batch_size": 8, "train": True}}
    val = {"type": "web_dataloader", "args": {"shards": data.pattern("val"), "dataset_size": 13, "shuffle": 0,
                                              "batch_size": 8, "train": False}}
    return train, bank, val


def test_train_one_epoch_from_shards(data, tmp_path):
    """24 training images, global batch 12: two GroCo steps, then k-NN of the 13 val images on the
    24-image bank, with a result for every query."""
    train, bank, val = shard_blocks(data)
    results, steps = run_one_epoch(small_config(train, bank, val, tmp_path), tmp_path, "shards")
    assert [s["step"] for s in steps] == [0, 1] and all(np.isfinite(s["loss"]) for s in steps)
    for phase in ("initial", "final"):
        accuracy = results[phase]["knn@3_online"]
        assert 0.0 <= accuracy <= 1.0 and (accuracy * 13) == pytest.approx(round(accuracy * 13))


def test_train_one_epoch_from_an_image_folder(data, tmp_path):
    train = {"type": "image_folder_dataloader", "args": {"root": str(data.raw), "shuffle": True, "batch_size": 12,
                                                         "transform_type": "dino", "n_augs": 2}}
    bank = {"type": "image_folder_dataloader", "args": {"root": str(data.raw), "shuffle": False, "batch_size": 8,
                                                        "train": True}}
    val = {"type": "image_folder_dataloader", "args": {"root": str(data.raw), "shuffle": False, "batch_size": 8,
                                                       "train": False}}
    results, steps = run_one_epoch(small_config(train, bank, val, tmp_path), tmp_path, "folders")
    assert [s["step"] for s in steps] == [0, 1] and all(np.isfinite(s["loss"]) for s in steps)
    assert set(results["final"]) == {"train_loss", "lr", "knn@3_online"}


@pytest.mark.slow
def test_train_one_epoch_from_shards_with_gpu_augmentation(data, tmp_path):
    """`augment_on: gpu`: the loader hands over JPEG files, the trainer decodes and augments them on
    the device (the CPU here, with the same code), the next batch on a background thread. A second
    run gives the same step losses: the views depend on the step, not on the thread's timing."""
    train, bank, val = shard_blocks(data, augment_on="gpu")
    results, steps = run_one_epoch(small_config(train, bank, val, tmp_path), tmp_path, "gpu_aug")
    assert [s["step"] for s in steps] == [0, 1] and all(np.isfinite(s["loss"]) for s in steps)
    assert "knn@3_online" in results["final"]
    _, again = run_one_epoch(small_config(train, bank, val, tmp_path), tmp_path, "gpu_aug_again")
    assert [s["loss"] for s in again] == [s["loss"] for s in steps]
    # decode_on cpu: the workers decode with PIL (libjpeg-turbo, as torchvision on the CPU), so the
    # trainer gets the same pixels and the run the same losses
    train, bank, val = shard_blocks(data, augment_on="gpu", decode_on="cpu")
    _, decoded_by_workers = run_one_epoch(small_config(train, bank, val, tmp_path), tmp_path, "gpu_aug_cpu_decode")
    assert [s["loss"] for s in decoded_by_workers] == [s["loss"] for s in steps]


@pytest.mark.slow
def test_train_throughput_bench_reads_real_shards(data, monkeypatch, capsys):
    """The bench's real-data mode: the reference-style path through the PIL recipe on a worker, ours
    augmenting on the device (the CPU here) the files it decodes or the worker decoded, each
    printing its samples/s. Run in this process as `python -m bench.train_throughput` runs it
    (batch 12: the reference-style loss's top-10 negatives need it)."""
    from bench import train_throughput

    # Width 16, not 8: on AVX-512 CPUs, torch 2.14's oneDNN corrupts the heap in the channels_last
    # weight gradient of a 1x1 stride-2 convolution with 8 input channels at 56 x 56.
    stdout = run_bench(train_throughput.main, ["--device", "cpu", "--arch", "resnet10", "--width", "16",
                                               "--batch", "12", "--steps", "1", "--warmup", "0", "--compile-mode",
                                               "--workers", "1", "--shards", data.pattern("train"),
                                               "--dataset-size", "24", "--shuffle", "8"], monkeypatch, capsys)
    rows = [line for line in stdout.splitlines() if "samples/s" in line]
    assert len(rows) == 5 and rows[0].startswith("reference-style") and "of the step" not in stdout
    feeds = [r.split("  ")[0].rsplit(", ", 1)[-1] for r in rows[1:]]
    assert feeds == ["decoded on the GPU", "decoded by CPU workers"] * 2


@pytest.mark.slow
def test_sigterm_while_prefetching_saves_and_resumes_exactly(data, tmp_path):
    """augment_on gpu prepares the next batch on a thread: a SIGTERM still stops the run after the
    step, saves and exits 143, 128 + SIGTERM (the thread ends), and resuming ends with an
    uninterrupted run's weights."""
    import signal

    import train
    from trainer.checkpoint import load_checkpoint

    train_block, bank, val = shard_blocks(data, augment_on="gpu")
    config = small_config(train_block, bank, val, tmp_path)
    config.update(evaluator=None, valid_dataloader=None)
    config["trainer"].update(epochs=4, init_val=False)
    path = tmp_path / "prefetch.yaml"
    path.write_text(json.dumps(config))
    interrupted = tmp_path / "interrupted"
    run, code, err = signal_after_steps(["--config", path, "--device", "cpu", f"save_dir={interrupted}"],
                                        interrupted / "models" / "prefetch", 3, timeout=300)  # inside epoch 1
    assert run is not None and code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    assert load_checkpoint(run / "latest_model.pth")["step"] < 8

    assert train.main(["--resume", str(run / "latest_model.pth"), "--device", "cpu"]) == 0
    assert train.main(["--config", str(path), "--device", "cpu", f"save_dir={tmp_path / 'straight'}"]) == 0
    straight = next((tmp_path / "straight" / "models" / "prefetch").iterdir())
    a, b = load_checkpoint(run / "latest_model.pth"), load_checkpoint(straight / "latest_model.pth")
    assert a["step"] == b["step"] == 8
    for part in ("encoder", "projection"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name} differs"


@pytest.mark.parametrize("kind", ["shards", "folder"])
def test_augmentation_without_workers_depends_on_seed_epoch_and_rank_only(data, tmp_path, kind):
    """num_workers 0: the recipe runs in the training process, on its global generators. Its views
    must not depend on what those went through before (a resume restores the generators of the
    moment of the stop, then reads and drops the epoch's earlier batches), and two processes (each
    seeded alike by train.py) must not draw the same crops: here both ranks' images are one picture.
    The pass leaves the process's generators as it found them."""
    import random

    def views(rank: int, world: int, start_step: int, noise: int, root=None) -> list[list[torch.Tensor]]:
        if kind == "shards":
            loader = web(root or data.pattern("train"), 24, 8, 4 * world, rank=rank, world=world,
                         transform_type="dino", n_augs=2)
        else:
            loader = ImageFolderLoader(LoaderRuntime(rank, world, 0), str(root or data.raw), shuffle=True,
                                       batch_size=4 * world, transform_type="dino", n_augs=2)
        loader.set_epoch(1, start_step)
        random.seed(noise)
        torch.manual_seed(noise)
        np.random.seed(noise)
        return [batch for batch, _ in loader]

    straight, resumed = views(0, 1, 0, noise=1), views(0, 1, 2, noise=2)
    assert len(straight) == 6 and len(resumed) == 4
    for a, b in zip(straight[2:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the process's own generators are as the pass found them
    torch.manual_seed(4)
    random.seed(4)
    before = torch.get_rng_state(), random.getstate()
    assert len(views(0, 1, 0, noise=4)) == 6
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]

    same = tmp_path / "same"
    picture = Image.effect_mandelbrot((160, 120), (-2.0, -1.2, 1.0, 1.2), 60).convert("RGB")
    for split, count in (("train", 24), ("val", 1)):
        (same / split / "c0").mkdir(parents=True)
        for i in range(count):
            picture.save(same / split / "c0" / f"c0_{i}.JPEG", quality=95)
    if kind == "shards":
        run_script(same, tmp_path / "same_shards", "--train-shard-size", "4", "--val-shard-size", "1")
        root = shard_pattern(tmp_path / "same_shards" / "train", "train")
    else:
        root = same
    rank0, rank1 = views(0, 2, 0, noise=3, root=root), views(1, 2, 0, noise=3, root=root)
    assert not torch.equal(rank0[0][0], rank1[0][0])


@pytest.mark.parametrize("kind,signum", [("shards", "SIGINT"), ("folder", "SIGINT"), ("shards", "SIGUSR1"),
                                         ("folder", "SIGTERM")])
def test_loader_workers_ignore_stop_signals(data, kind, signum):
    """A terminal's Ctrl-C, SLURM's SIGUSR1 and SIGTERM reach the loader's worker processes too:
    they keep going (had one died, the DataLoader would raise that it exited unexpectedly), so
    that the training process can finish its step and save."""
    import os
    import signal

    import psutil

    if kind == "shards":
        loader = web(data.pattern("train"), 24, 8, 4, transform_type="val", num_workers=1)
    else:
        loader = ImageFolderLoader(LoaderRuntime(), str(data.raw), shuffle=True, batch_size=4, num_workers=1)
    loader.set_epoch(0)
    before = {p.pid for p in psutil.Process().children()}
    batches = iter(loader)
    first = next(batches)
    workers = [p.pid for p in psutil.Process().children() if p.pid not in before]
    assert len(workers) == 1
    os.kill(workers[0], getattr(signal, signum))
    rest = list(batches)
    assert len(rest) == len(loader) - 1 == 5 and first[1].shape == (4,)


def run_python(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`script` run by a new Python in the repository, its output captured (the timeout only
    catches a hang)."""
    return subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "folder"])
def test_stop_signals_while_workers_start_do_not_kill_them(data, kind):
    """A stop signal can reach a worker before it has set itself to ignore it (`init_worker`):
    each epoch starts new workers, and a spawned one (macOS) imports torch first, for a second or
    so. Workers start with the stop signals blocked, so a SIGINT, SIGTERM and SIGUSR1 sent to them
    the moment they exist (still starting) are ignored, and every batch comes."""
    script = f"""
import multiprocessing, os, signal, threading, time, psutil
multiprocessing.set_start_method("spawn", force=True)
from data_loader.base import LoaderRuntime
from data_loader.folder import ImageFolderLoader
from data_loader.webdata import WebLoader
if {kind!r} == "shards":
    loader = WebLoader(LoaderRuntime(), {data.pattern("train")!r}, 24, 8, 4, num_workers=1, transform_type="val")
else:
    loader = ImageFolderLoader(LoaderRuntime(), {str(data.raw)!r}, True, 4, num_workers=1)
loader.set_epoch(0)
signalled = []
def signal_the_workers():
    while len(signalled) < 1:
        for worker in psutil.Process().children():
            try:
                # a spawned worker once it runs: a child not yet exec'd still shows this script's
                # command line, and so would the resource tracker's as it starts
                starting = worker.pid not in signalled and worker.cmdline()[-1:] == ["--multiprocessing-fork"]
            except psutil.Error:  # a child that has just ended
                continue
            if starting:
                for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
                    os.kill(worker.pid, getattr(signal, name))
                signalled.append(worker.pid)
        time.sleep(0.001)
threading.Thread(target=signal_the_workers, daemon=True).start()
print(len(list(loader)), len(signalled), flush=True)
"""
    done = run_python(script)
    assert done.returncode == 0 and done.stdout.split() == ["6", "1"], done.stderr[-3000:]


@pytest.mark.slow
def test_workers_started_without_fork_end_cleanly(data):
    """macOS starts DataLoader workers by spawn (Linux from Python 3.14 by forkserver, which ends
    them the same way). Two epochs of each loader, whose workers are stopped at every epoch's end
    with batches still queued: no worker aborts (it did, finalising its interpreter while a queue
    thread shared a tensor)."""
    script = f"""
import multiprocessing
multiprocessing.set_start_method("spawn", force=True)
from data_loader.base import LoaderRuntime
from data_loader.folder import ImageFolderLoader
from data_loader.webdata import WebLoader
loaders = [WebLoader(LoaderRuntime(), {data.pattern("train")!r}, 24, 8, 4, num_workers=1, transform_type="dino",
                     n_augs=2),
           ImageFolderLoader(LoaderRuntime(), {str(data.raw)!r}, True, 4, num_workers=1, transform_type="dino",
                             n_augs=2)]
for loader in loaders:
    for epoch in range(2):
        loader.set_epoch(epoch)
        print(sum(1 for _ in loader), flush=True)
"""
    done = run_python(script)
    assert done.returncode == 0 and done.stdout.split() == ["6"] * 4, done.stderr[-3000:]
    for sign in ("terminate called", "Aborted", "Exception ignored"):
        assert sign not in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_process_exits_with_its_loader_workers_alive(data, start):
    """The workers ignore SIGTERM, which multiprocessing sends its daemonic children at exit before
    waiting for them: a process that exits with an iterator still alive (kept in a variable, or
    held by the traceback of a crash mid-epoch) must end all the same, without noise (it waited
    forever). The timeout only catches that hang."""
    script = f"""
import multiprocessing, sys
multiprocessing.set_start_method({start!r}, force=True)
from data_loader.base import LoaderRuntime
from data_loader.folder import ImageFolderLoader
from data_loader.webdata import WebLoader
kept = ImageFolderLoader(LoaderRuntime(), {str(data.raw)!r}, True, 4, num_workers=1, transform_type="dino", n_augs=2)
kept.set_epoch(0)
kept_batches = iter(kept)
next(kept_batches)
crashing = WebLoader(LoaderRuntime(), {data.pattern("train")!r}, 24, 8, 4, num_workers=1, transform_type="val")
crashing.set_epoch(0)
for step, _ in enumerate(crashing):
    print(step, flush=True)
    if step == 1:
        raise RuntimeError("a crash mid-epoch")
"""
    done = run_python(script, timeout=120)
    assert done.returncode == 1 and done.stdout.split() == ["0", "1"], done.stderr[-3000:]
    assert done.stderr.rstrip().endswith("RuntimeError: a crash mid-epoch"), done.stderr[-3000:]
    for sign in ("killed by signal", "Exception ignored", "Aborted"):
        assert sign not in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_saves_and_resumes(data, tmp_path):
    """A Ctrl-C in a terminal: SIGINT to train.py and its two loader workers at once. The run
    finishes its step, saves and exits 130 (the shell's code for it), without a
    traceback; resuming completes the run."""
    import os
    import signal
    import time

    import train
    from trainer.checkpoint import load_checkpoint

    train_block, _, _ = shard_blocks(data, num_workers=2)
    config = small_config(train_block, {}, {}, tmp_path)
    config.update(evaluator=None, valid_dataloader=None)
    config["trainer"].update(epochs=4, init_val=False)
    path = tmp_path / "ctrl_c.yaml"
    path.write_text(json.dumps(config))
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(path), "--device", "cpu",
                             f"save_dir={interrupted}"], cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    run, deadline = None, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list((interrupted / "models" / "ctrl_c").glob("*/metrics.jsonl"))
        if found and sum('"loss"' in line for line in open(found[0])) >= 3:  # inside epoch 1
            run = found[0].parent
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    err = proc.communicate(timeout=300)[1]
    assert run is not None and proc.returncode == 130, err
    assert "received SIGINT" in err and "stopped by SIGINT" in err and "Traceback" not in err, err
    assert load_checkpoint(run / "latest_model.pth")["step"] < 8

    assert train.main(["--resume", str(run / "latest_model.pth"), "--device", "cpu"]) == 0
    assert load_checkpoint(run / "latest_model.pth")["step"] == 8


def test_gpu_augmentation_loaders_yield_files_and_refuse_evaluation(data, tmp_path, capsys):
    loader = web(data.pattern("train"), 24, 8, 12, transform_type="dino", n_augs=2, augment_on="gpu", num_workers=1)
    files, labels = next(iter(loader))  # one buffer for the batch's files, read by a worker process
    assert isinstance(files, PackedFiles) and files.data.dtype == torch.uint8 and len(files) == 12
    assert all(bytes(files[i][:2].numpy()) in (b"\xff\xd8", b"\x89P") for i in range(12))
    assert labels.shape == (12,)
    with pytest.raises(ConfigError, match="augment_on: 'gpu' is for training loaders"):
        web(data.pattern("val"), 13, 0, 4, train=False, transform_type="dino", n_augs=2, augment_on="gpu")
    with pytest.raises(ConfigError, match="val"):
        web(data.pattern("train"), 24, 8, 12, transform_type="val", n_augs=1, augment_on="gpu")
    # a file that is no image in a GPU-augmented training batch: replaced, logged, the batch keeps its size
    raw = tmp_path / "raw"
    make_tree(raw, {"train": {"a": ["rgb"] * 6, "b": ["rgb"] * 5}, "val": {"a": ["rgb"], "b": ["rgb"]}}, 200)
    (raw / "train" / "b" / "b_broken.JPEG").write_bytes(b"this is not a JPEG file")
    run_script(raw, tmp_path / "shards", "--train-shard-size", "4")
    train = {"type": "web_dataloader", "args": {"shards": shard_pattern(tmp_path / "shards" / "train", "train"),
                                                "dataset_size": 12, "shuffle": 4, "batch_size": 12,
                                                "transform_type": "dino", "n_augs": 2, "augment_on": "gpu"}}
    _, bank, val = shard_blocks(data)
    _, steps = run_one_epoch(small_config(train, bank, val, tmp_path), tmp_path, "gpu_aug_corrupt")
    assert len(steps) == 1 and np.isfinite(steps[0]["loss"])
    assert "another image of the batch takes its place" in capsys.readouterr().err


def test_loaders_decoding_for_the_gpu_hand_over_packed_pixels(data, corrupt, warnings_of_groco):
    """`augment_on: gpu, decode_on: cpu`: the workers decode every file as the PIL recipes do (CMYK,
    grey and PNG included) and hand a batch over as one uint8 buffer; an undecodable file is handled
    as in the PIL recipes' path (skipped from shards, replaced in folders)."""
    loader = web(data.pattern("train"), 24, 8, 12, transform_type="dino", n_augs=2, augment_on="gpu",
                 decode_on="cpu", num_workers=1)
    assert loader.gpu_recipe is not None
    images, labels = next(iter(loader))
    assert isinstance(images, PackedImages) and images.data.dtype == torch.uint8 and labels.shape == (12,)
    assert images.data.numel() == int(images.shapes.prod(1).sum()) * 3
    files, _ = next(iter(web(data.pattern("train"), 24, 8, 12, transform_type="dino", n_augs=2, augment_on="gpu",
                             num_workers=1)))  # the same stream, undecoded
    for pixels, file in zip(images.unpack(), files.unpack()):
        assert pixels.shape[0] == 3 and torch.equal(pixels, pil_to_tensor(decode_image(bytes(file.numpy()), "x")))
    with pytest.raises(ConfigError, match="decode_on: 'gpu' needs augment_on: 'gpu'"):
        web(data.pattern("train"), 24, 8, 12, transform_type="dino", n_augs=2, decode_on="gpu")
    with pytest.raises(ConfigError, match="augment_on: 'gpu' is for training loaders"):
        web(data.pattern("val"), 13, 0, 4, train=False, transform_type="dino", n_augs=2, augment_on="gpu",
            decode_on="cpu")
    [(images, labels)] = list(folder(corrupt.raw, True, 11, transform_type="dino", n_augs=2, augment_on="gpu",
                                     decode_on="cpu"))
    assert len(images) == len(labels) == 11  # the broken file's place taken by another image
    [record] = [r for r in warnings_of_groco.records if "undecodable" in r.getMessage()]
    assert "c2_0107.JPEG" in record.getMessage()


def test_batch_generator_takes_any_seed():
    """seed: null draws seeds up to 2**31; the per-batch seed once overflowed from about 18,282 on."""
    draws = [torch.rand(3, generator=batch_generator(seed, 99, 5004, 7)) for seed in (2**31 - 1, 2**31 - 1, 18_283)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    small = ((5 * 1_000_003 + 1) * 1_000_033 + 2) * 1009 + 0  # small seeds keep their streams
    assert torch.equal(torch.rand(3, generator=batch_generator(5, 1, 2)),
                       torch.rand(3, generator=torch.Generator().manual_seed(small)))

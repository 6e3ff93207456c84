"""A WebDataset shard cut short: training reads on from the next shard with one warning and keeps its
epoch length; an evaluation pass stops with one line naming the shard."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from data_loader.base import DataError
from data_loader.webdata import ShardError, endless_samples, shard_samples

from .conftest import run_train
from .test_data import (
    MAIN_LAYOUT,
    Data,
    identify,
    make_tree,
    run_script,
    shard_keys,
    small_config,
    view_colours,
    web,
)

CUT_TRAIN = "imagenet-train-000002.tar"  # 4 samples, cut inside the third one's image: 2 read
CUT_VAL = "imagenet-val-000001.tar"  # 3 samples, cut inside the second one's image: 1 read


def cut_inside(shard: Path, member: int) -> None:
    """Cut `shard` in the middle of the data of its `member`-th file (0-based; a sample's image,
    then its metadata), as a copy that stopped midway leaves it."""
    with tarfile.open(shard) as tar:
        info = tar.getmembers()[member]
    shard.write_bytes(shard.read_bytes()[: info.offset_data + info.size // 2])


@dataclasses.dataclass
class CutShards(Data):
    lost: list[str]  # the keys of CUT_TRAIN after the cut


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> CutShards:
    """test_data's 24 train images in 6 shards of 4 and 13 val images in 5 shards of 3 (the last
    holding 1), CUT_TRAIN and CUT_VAL cut."""
    root = tmp_path_factory.mktemp("cut")
    entries = make_tree(root / "raw", MAIN_LAYOUT)
    run_script(root / "raw", root / "out", "--train-shard-size", "4", "--val-shard-size", "3")
    lost = shard_keys(root / "out" / "train" / CUT_TRAIN)[2:]
    cut_inside(root / "out" / "train" / CUT_TRAIN, member=4)  # a sample's files: its image, then its metadata
    cut_inside(root / "out" / "val" / CUT_VAL, member=2)
    return CutShards(root / "raw", root / "out", entries, lost)


@pytest.mark.parametrize("member,read", [(0, 0), (1, 0), (4, 2), (5, 2), (7, 3)])
def test_a_cut_shard_yields_the_complete_samples_before_the_cut(tmp_path, shards, member, read):
    """Cut inside a sample's image or its metadata: the complete samples before it, then ShardError;
    the sample the cut went through is not handed over incomplete."""
    shard = tmp_path / "imagenet-train-000000.tar"
    shutil.copy(shards.out / "train" / "imagenet-train-000000.tar", shard)
    with tarfile.open(shard) as tar:
        order = [m.name.split(".")[0] for m in tar.getmembers()][::2]
    cut_inside(shard, member)
    samples = []
    with pytest.raises(ShardError, match=rf"shard {re.escape(str(shard))} is cut short.*: {read} samples read "
                                         r"before the cut") as err:
        for sample in shard_samples(str(shard)):
            samples.append(sample)
    assert "how many were lost is unknown: no metadata.json" in str(err.value)  # a copy away from its folder
    assert [s["__key__"] for s in samples] == order[:read]
    assert all({"image.jpg", "metadata.pyd"} <= set(s) for s in samples)


def test_a_file_that_is_no_tar_is_a_shard_error(tmp_path):
    shard = tmp_path / "imagenet-train-000000.tar"
    shard.write_bytes(b"<html>not found</html>" * 50)
    with pytest.raises(ShardError, match=rf"shard {re.escape(str(shard))} is cut short or corrupt.*: 0 samples"):
        list(shard_samples(str(shard)))


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_training_reads_on_past_a_cut_shard(shards, num_workers, warnings_of_groco):
    """48 samples an epoch from the 22 readable ones: the reader holding the cut shard reads it at
    least twice, yet every batch is full and the epoch has its length; the two samples after the
    cut never appear, all the others do. One warning names the shard (checked without workers: a
    worker's log records stay in its process)."""
    readable = {e.key for e in shards.entries["train"]} - set(shards.lost)
    loader = web(shards.pattern("train"), 48, 5, 8, num_workers=num_workers)
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and all(len(target) == 8 for _, target in batches)
    keys = [k for views, _ in batches for k in identify(view_colours(views[0]), shards.entries["train"])]
    assert set(keys) == readable
    if num_workers == 0:
        warnings = [r.getMessage() for r in warnings_of_groco.records if "cut short" in r.getMessage()]
        assert len(warnings) == 1
        assert f"{CUT_TRAIN} is cut short" in warnings[0]
        assert "2 of its 4 samples read before the cut, 2 lost" in warnings[0] and "skips the rest" in warnings[0]


def test_a_reader_whose_shards_hold_no_readable_sample_stops(tmp_path, warnings_of_groco):
    """Rather than stream nothing forever: a DataError naming the shards, after one warning each."""
    shard = tmp_path / "imagenet-train-000000.tar"
    shard.write_bytes(b"<html>not found</html>" * 50)
    with pytest.raises(DataError, match=rf"the shards \['{re.escape(str(shard))}'\] hold no readable samples"):
        next(endless_samples([str(shard)], random.Random(0)))
    assert len([r for r in warnings_of_groco.records if "cut short" in r.getMessage()]) == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_evaluation_stops_at_a_cut_shard_with_one_line(shards, num_workers):
    """The finite pass (k-NN bank and queries, linear-probe features) reads every sample or stops: a
    cut shard is a ShardError, a DataError, which the command line reports as one line (exit status
    2), also when a worker hits it."""
    loader = web(shards.pattern("val"), 13, 0, 4, train=False, num_workers=num_workers)
    message = rf"shard \S+/{CUT_VAL} is cut short.*: 1 of its 3 samples read before the cut, 2 lost"
    with pytest.raises(ShardError, match=message) as err:
        list(loader)
    assert isinstance(err.value, DataError) and "\n" not in str(err.value)


def cut_config(shards: CutShards, tmp_path: Path) -> Path:
    """test_data's small GroCo run (one epoch, k-NN with init_val) on the cut training shards, which
    are also the k-NN bank and queries; written as tmp_path/cut.yaml."""
    train = {"type": "web_dataloader", "args": {"shards": shards.pattern("train"), "dataset_size": 24, "shuffle": 8,
                                                "batch_size": 12, "transform_type": "dino", "n_augs": 2}}
    bank = {"type": "web_dataloader", "args": {"shards": shards.pattern("train"), "dataset_size": 24, "shuffle": 0,
                                               "batch_size": 8, "train": True}}
    queries = {**bank, "args": {**bank["args"], "train": False}}
    path = tmp_path / "cut.yaml"
    path.write_text(json.dumps(small_config(train, bank, queries, tmp_path)))  # JSON is YAML
    return path


@pytest.mark.slow
def test_train_py_trains_over_a_cut_shard(shards, tmp_path):
    """train.py, one epoch of 24 samples from the cut shards: both steps run, the log names the shard."""
    assert run_train("--config", cut_config(shards, tmp_path), "--device", "cpu", "encoder.args.arch=resnet10",
                     "trainer.init_val=false", "evaluator=null", "valid_dataloader=null") == 0
    run = next((tmp_path / "models" / "cut").iterdir())
    steps = [json.loads(line) for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert [s["step"] for s in steps] == [0, 1] and all(math.isfinite(s["loss"]) for s in steps)
    assert f"/{CUT_TRAIN} is cut short" in (run / "train.log").read_text()


def test_train_py_stops_at_a_cut_shard_in_evaluation(shards, tmp_path, capsys):
    """The initial k-NN evaluation reads the cut shard in its bank: one error line names it, status 2."""
    assert run_train("--config", cut_config(shards, tmp_path), "--device", "cpu", "encoder.args.arch=resnet10") == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if f"ERROR shard {shards.out}" in line]) == 1
    assert f"/{CUT_TRAIN} is cut short" in err and "Traceback" not in err

"""ImageNet's archives read in place (preprocessing/imagenet_archives.py), parallel and resumable
shard writing: on a miniature ImageNet in the real formats (a train tar of class tars, a flat val
tar, a devkit .tar.gz with meta.mat and the validation ground truth)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from preprocessing import create_tar_webdataset as shards_script
from preprocessing import imagenet_archives
from preprocessing.imagenet_archives import ArchiveError
from tests.test_data import run_script, shard_keys

ROOT = Path(__file__).resolve().parents[1]
# (ILSVRC2012_ID, WNID, words, num_children); the inner synset sits among the leaves, and two
# classes share the name "crane", as ImageNet's do
SYNSETS = [(1, "n02000002", "crane", 0), (2, "n01000001", "tench, Tinca tinca", 0),
           (5, "n09000009", "animal, animate being", 2), (3, "n03000003", "crane, derrick", 0),
           (4, "n04000004", "goldfish, Carassius auratus", 0)]
LEAVES = ["n02000002", "n01000001", "n03000003", "n04000004"]
TRAIN_KINDS = {"n01000001": ["rgb", "rgb", "cmyk"], "n02000002": ["rgb", "png", "rgb", "rgb"],
               "n03000003": ["rgb", "rgb"], "n04000004": ["rgb", "rgb", "rgb"]}
VAL_LABELS = [3, 1, 4, 2, 2, 1, 3, 4, 1]  # ILSVRC2012_IDs, one a line
SHARDS = ["--train-shard-size", "3", "--val-shard-size", "2"]


def jpeg(i: int, kind: str = "rgb") -> bytes:
    image = Image.new("RGB", (8 + i % 5, 8 + i % 3), (20 * i % 256, 40, 90))
    buffer = io.BytesIO()
    if kind == "cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=90)
    elif kind == "png":  # ImageNet's n02105855_2933.JPEG is a PNG
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_300_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def devkit_bytes(num_train: dict[str, int], val_labels: list[int]) -> bytes:
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(SYNSETS), 1), dtype=[(name, "O") for name in fields])
    for row, (idx, wnid, words, children) in enumerate(SYNSETS):
        synsets[row, 0] = (np.array([[idx]], dtype=np.uint16), np.array([wnid]), np.array([words]),
                           np.array([f"gloss of {wnid}"]), np.array([[children]], dtype=np.uint8),
                           np.array([[2, 4]] if children else np.zeros((1, 0)), dtype=np.uint8),
                           np.array([[0 if not children else 1]], dtype=np.uint8),
                           np.array([[num_train.get(wnid, 0)]], dtype=np.uint16))
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    truth = "".join(f"{label}\n" for label in val_labels).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue()),
                           ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth),
                           ("ILSVRC2012_devkit_t12/readme.txt", b"devkit")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclasses.dataclass
class Mini:
    root: Path
    images: dict[str, bytes]  # key -> the file's bytes


def make_imagenet(root: Path, extra_class_member: tuple[str, bytes] | None = None, count_delta: int = 0,
                  extra_val_lines: int = 0) -> Mini:
    """The three archives in `root`, optionally broken: `extra_class_member` in the first class
    tar, a devkit count `count_delta` off, `extra_val_lines` more ground-truth lines."""
    root.mkdir(parents=True, exist_ok=True)
    images, outer, i = {}, [], 0
    for wnid, kinds in TRAIN_KINDS.items():
        inner = []
        for n, kind in enumerate(kinds):
            key = f"{wnid}_{100 - 7 * n}"  # not in name order
            images[key] = jpeg(i, kind)
            inner.append((f"{key}.JPEG", images[key]))
            i += 1
        if extra_class_member and not outer:
            inner.append(extra_class_member)
        outer.append((f"{wnid}.tar", tar_bytes(inner)))
    (root / imagenet_archives.TRAIN_TAR).write_bytes(tar_bytes(outer[::-1]))  # classes not in order
    val = []
    for n in range(len(VAL_LABELS)):
        key = f"ILSVRC2012_val_{n + 1:08d}"
        images[key] = jpeg(i)
        val.append((f"{key}.JPEG", images[key]))
        i += 1
    (root / imagenet_archives.VAL_TAR).write_bytes(tar_bytes(val[3:] + val[:3]))
    num_train = {wnid: len(kinds) for wnid, kinds in TRAIN_KINDS.items()}
    num_train["n03000003"] += count_delta
    (root / imagenet_archives.DEVKIT).write_bytes(devkit_bytes(num_train, VAL_LABELS + [1] * extra_val_lines))
    return Mini(root, images)


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.md5(p.read_bytes()).hexdigest()) for p in sorted(folder.rglob("*"))}


def output_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def shards_of(out: Path) -> dict[str, bytes]:
    return {name: data for name, data in output_files(out).items() if name.endswith(".tar")}


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Mini:
    return make_imagenet(tmp_path_factory.mktemp("imagenet") / "original")


@pytest.fixture(scope="module")
def written(mini, tmp_path_factory) -> Path:
    """The archive path's output, written by one process."""
    out = tmp_path_factory.mktemp("archive_out")
    before = snapshot(mini.root)
    assert run_script(mini.root, out, *SHARDS, "--workers", "1") == {"train": 12, "val": 9}
    assert snapshot(mini.root) == before  # nothing extracted, nothing written beside the archives
    return out


# ----------------------------------------------------------------------------- the archive path


def test_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert imagenet_archives.IMG_EXTENSIONS == IMG_EXTENSIONS


def test_tar_writer_matches_webdataset(mini):
    import webdataset as wds

    samples = [(key, data, b"meta" * i) for i, (key, data) in enumerate(list(mini.images.items())[:4])]
    ours, theirs = io.BytesIO(), io.BytesIO()
    shards_script.write_samples(ours, samples)
    with wds.TarWriter(theirs, encoder=False, mtime=0) as sink:
        for key, image, meta in samples:
            sink.write({"__key__": key, "image.jpg": image, "metadata.pyd": meta})
    assert ours.getvalue() == theirs.getvalue()


def test_archive_shards_hold_the_images_as_they_are(mini, written):
    import pickle

    metadata = json.loads((written / "metadata.json").read_text())
    wnids = sorted(LEAVES)
    assert metadata["wnids"] == wnids
    assert metadata["classes"] == [["tench", "Tinca tinca"], ["crane"], ["crane", "derrick"],
                                   ["goldfish", "Carassius auratus"]]
    assert metadata["class_to_idx"] == {"tench": 0, "Tinca tinca": 0, "crane": 2, "derrick": 2, "goldfish": 3,
                                        "Carassius auratus": 3}
    assert metadata["shard_samples"] == {**{f"train/imagenet-train-{i:06d}.tar": 3 for i in range(4)},
                                         **{f"val/imagenet-val-{i:06d}.tar": 2 for i in range(4)},
                                         "val/imagenet-val-000004.tar": 1}
    val_wnid = {f"ILSVRC2012_val_{n + 1:08d}": dict((i, w) for i, w, _, c in SYNSETS if not c)[label]
                for n, label in enumerate(VAL_LABELS)}
    seen = {}
    for shard in sorted(written.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in shard_keys(shard):
            seen[key] = members[f"{key}.image.jpg"]
            meta = pickle.loads(members[f"{key}.metadata.pyd"])
            wnid = val_wnid.get(key, key.split("_")[0])
            assert meta == {"cls": wnids.index(wnid), "wnid": wnid}
    assert seen == mini.images  # every image once, its bytes as they are (the CMYK JPEG, the PNG)
    assert not (written / ".imagenet-train-plan.json").exists()


def test_archive_path_writes_what_torchvision_and_the_folder_path_write(mini, written, tmp_path, monkeypatch):
    """torchvision's parser (its MD5 check skipped: a miniature set) extracts the archives; the
    shards written from its folder, and from the extracted tree alone, are the archive path's."""
    import torchvision.datasets.imagenet as tv_imagenet

    monkeypatch.setattr(tv_imagenet, "_verify_archive", lambda *args: None)
    extracted = tmp_path / "extracted"
    shutil.copytree(mini.root, extracted)
    for split in ("train", "val"):
        tv_imagenet.ImageNet(str(extracted), split=split)
    for name in imagenet_archives.ARCHIVES.values():
        (extracted / name).unlink()  # torchvision's folder: meta.bin, train/, val/ and the devkit
    run_script(extracted, tmp_path / "torchvision", *SHARDS, "--workers", "1")
    assert output_files(tmp_path / "torchvision") == output_files(written)  # metadata.json too
    (extracted / "meta.bin").unlink()
    (extracted / imagenet_archives.DEVKIT).unlink()
    run_script(extracted, tmp_path / "folders", *SHARDS, "--workers", "1")
    assert shards_of(tmp_path / "folders") == shards_of(written)
    ours, theirs = (json.loads((out / "metadata.json").read_text()) for out in (written, tmp_path / "folders"))
    for name in ("classes", "class_to_idx"):  # the folder path names a class by its wnid
        ours.pop(name), theirs.pop(name)
    assert ours == theirs


@pytest.mark.slow
def test_worker_count_does_not_change_the_output(mini, written, tmp_path):
    run_script(mini.root, tmp_path / "three", *SHARDS, "--workers", "3")
    assert output_files(tmp_path / "three") == output_files(written)


def test_an_extracted_tree_beside_the_archives_is_read_as_today(mini, tmp_path):
    """torchvision's extracted folder (meta.bin, train/) beside the archives: read as before,
    through torchvision, not the archives."""
    import torch

    root = tmp_path / "both"
    shutil.copytree(mini.root, root)
    (root / "train" / "n01000001").mkdir(parents=True)
    (root / "train" / "n01000001" / "x.JPEG").write_bytes(jpeg(1))
    torch.save(({"n01000001": ("tench",)}, []), root / "meta.bin")
    source = shards_script.read_source(root, ["train"])
    assert source.locations is None and source.samples["train"] == [(str(root / "train" / "n01000001" / "x.JPEG"), 0)]


# ----------------------------------------------------------------------------- resuming


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from preprocessing import create_tar_webdataset as m
read, calls = m.ImageReader.read, [0]
def read_then_die(self, record):
    calls[0] += 1
    if calls[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return read(self, record)
m.ImageReader.read = read_then_die
m.main({argv!r})
"""


def killed_run(mini: Mini, out: Path, kill_at: int, *extra: str) -> None:
    """A run SIGKILLed as it reads its `kill_at`-th image (the 8th: 2 train shards complete, the
    third half written)."""
    argv = ["--input", str(mini.root), "--output", str(out), *SHARDS, "--workers", "1", *extra]
    script = KILLER.format(root=str(ROOT), kill_at=kill_at, argv=argv)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]


@pytest.mark.slow
def test_a_killed_run_started_again_ends_as_an_uninterrupted_one(mini, written, tmp_path):
    out = tmp_path / "out"
    killed_run(mini, out, kill_at=8)
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "imagenet-train-000000.tar", "imagenet-train-000001.tar", "imagenet-train-000002.tar.partial"]
    assert (out / ".imagenet-train-plan.json").is_file() and not (out / "metadata.json").exists()
    first = {name: (out / "train" / name).stat().st_mtime_ns for name in ("imagenet-train-000000.tar",)}
    # a shard cut short after the kill (a copy, say) does not count as complete
    (out / "train" / "imagenet-train-000001.tar").write_bytes((out / "train" / "imagenet-train-000001.tar")
                                                              .read_bytes()[:1024])
    run_script(mini.root, out, *SHARDS, "--workers", "2")
    assert output_files(out) == output_files(written)
    assert (out / "train" / "imagenet-train-000000.tar").stat().st_mtime_ns == first["imagenet-train-000000.tar"]
    # a finished run is not resumed: as before, a second run needs --overwrite
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_script(mini.root, out, *SHARDS)


@pytest.mark.slow
def test_a_killed_run_is_not_resumed_with_other_arguments(mini, tmp_path):
    out = tmp_path / "out"
    killed_run(mini, out, kill_at=8)
    with pytest.raises(FileExistsError, match="other arguments; pass --overwrite"):
        run_script(mini.root, out, *SHARDS, "--seed", "1")
    assert run_script(mini.root, out, *SHARDS, "--seed", "1", "--overwrite") == {"train": 12, "val": 9}


# ----------------------------------------------------------------------------- bad archives


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def break_train_mid_member(root: Path) -> None:
    truncate(root / imagenet_archives.TRAIN_TAR, 3000)


def break_train_at_boundary(root: Path) -> None:  # whole members kept, the end-of-archive blocks lost
    with tarfile.open(root / imagenet_archives.TRAIN_TAR) as tar:
        members = tar.getmembers()
    truncate(root / imagenet_archives.TRAIN_TAR, members[-1].offset)


def break_val(root: Path) -> None:  # the last image cut in two
    with tarfile.open(root / imagenet_archives.VAL_TAR) as tar:
        last = tar.getmembers()[-1]
    truncate(root / imagenet_archives.VAL_TAR, last.offset_data + last.size // 2)


def break_devkit(root: Path) -> None:
    truncate(root / imagenet_archives.DEVKIT, os.path.getsize(root / imagenet_archives.DEVKIT) // 2)


BAD = {
    "truncated train tar": (break_train_mid_member, {},
                            r"ILSVRC2012_img_train\.tar: (n\d+\.tar: )?truncated"),
    "train tar cut between members": (break_train_at_boundary, {},
                                      r"ILSVRC2012_img_train\.tar: truncated or damaged after n\d+\.tar"),
    "truncated val tar": (break_val, {}, r"ILSVRC2012_img_val\.tar: truncated"),
    "missing devkit": (lambda root: (root / imagenet_archives.DEVKIT).unlink(), {},
                       r"ILSVRC2012_devkit_t12\.tar\.gz: missing"),
    "truncated devkit": (break_devkit, {}, r"ILSVRC2012_devkit_t12\.tar\.gz: cannot read the devkit"),
    "a text file": (None, {"extra_class_member": ("readme.txt", b"hello")},
                    r"ILSVRC2012_img_train\.tar: n01000001\.tar: readme\.txt is not an image file"),
    "not an image under a .JPEG name": (None, {"extra_class_member": ("n01000001_9.JPEG", b"<html>oops</html>")},
                                        r"n01000001\.tar: n01000001_9\.JPEG is not an image file \(it starts"),
    "a class count not the devkit's": (None, {"count_delta": 1},
                                       r"n03000003\.tar: 2 images, but the devkit's num_train_images says 3"),
    "a val count not the devkit's": (None, {"extra_val_lines": 1},
                                     r"ILSVRC2012_img_val\.tar: 9 images, but .*ground_truth\.txt has 10 lines"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_archives_are_refused_in_one_line(case, mini, tmp_path):
    damage, options, message = BAD[case]
    root = tmp_path / "original"
    if options:
        make_imagenet(root, **options)
    else:
        shutil.copytree(mini.root, root)
    if damage:
        damage(root)
    with pytest.raises(ArchiveError, match=message) as error:
        run_script(root, tmp_path / "out", *SHARDS, "--workers", "1")
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_check_md5_refuses_other_archives(mini, tmp_path):
    with pytest.raises(ArchiveError, match=r"ILSVRC2012_devkit_t12\.tar\.gz: MD5 [0-9a-f]{32}, not ImageNet's"):
        run_script(mini.root, tmp_path / "out", "--check-md5")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_command_line_prints_one_line(mini, tmp_path):
    root = tmp_path / "original"
    shutil.copytree(mini.root, root)
    break_val(root)
    result = subprocess.run([sys.executable, str(ROOT / "preprocessing" / "create_tar_webdataset.py"),
                             "--input", str(root), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("create_tar_webdataset.py: error: ") and "ILSVRC2012_img_val.tar: truncated" in last
    assert "Traceback" not in result.stderr

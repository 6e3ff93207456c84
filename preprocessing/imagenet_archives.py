"""ImageNet's original archives, read in place: an index of every image's offset and size.

`index_archives(root, splits)` reads the devkit (`data/meta.mat`, the validation ground truth) and
only the tar headers of `ILSVRC2012_img_train.tar`, of each class tar inside it, and of
`ILSVRC2012_img_val.tar`; an image's bytes are then `os.pread(archive, size, offset)`. Nothing is
extracted and nothing is written beside the archives.

The samples come in the order, with the classes, that torchvision's `ImageNet` gives once it has
extracted the archives (`parse_train_archive`, `parse_val_archive`, then `ImageFolder`): the
classes are the sorted class tars' names; a class's images are sorted by folder then file name;
the validation images, sorted by name, take the ground truth's labels line by line, then are
ordered by wnid and name. Where torchvision would silently read less (a truncated archive, a count
that differs from the devkit's, a file that is not an image), `ArchiveError` says what and where.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import posixpath
import tarfile
import zlib
from pathlib import Path

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
ARCHIVES = {"train": TRAIN_TAR, "val": VAL_TAR}
# torchvision.datasets.imagenet.ARCHIVE_META
MD5 = {TRAIN_TAR: "1d675b47d978889d74fa0da5fadfb00e", VAL_TAR: "29b22e2961454d5413ddabcf34fc5622",
       DEVKIT: "fa75699e90414af021442c21a62c3abf"}
META_MAT = "data/meta.mat"
VAL_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
# torchvision.datasets.folder.IMG_EXTENSIONS (tested equal): the files ImageFolder reads
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BLOCK = tarfile.BLOCKSIZE


class ArchiveError(ValueError):
    """An archive that cannot give the dataset; the message, one line, names the file and member."""


@dataclasses.dataclass(frozen=True)
class Image:
    """One image: `name` as torchvision's extraction would place it (`train/<wnid>/<file>`,
    `val/<wnid>/<file>`), its wnid, and where its bytes lie."""

    name: str
    wnid: str
    archive: str
    offset: int
    size: int


@dataclasses.dataclass
class Devkit:
    wnid_to_classes: dict[str, tuple[str, ...]]  # the leaf synsets, in meta.mat's order
    num_train_images: dict[str, int]
    val_wnids: list[str]  # the ground truth's lines, as wnids


@dataclasses.dataclass
class ArchiveIndex:
    devkit: Devkit
    images: dict[str, list[Image]]  # per split, in torchvision's ImageFolder order
    wnids: dict[str, list[str]]  # per split: the sorted class folders torchvision's extraction makes


def archives_present(root: Path) -> bool:
    return any((root / name).exists() for name in (TRAIN_TAR, VAL_TAR, DEVKIT))


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def is_image_data(head: bytes) -> bool:
    """Whether `head` (a file's first 12 bytes) starts like a file of IMG_EXTENSIONS' formats."""
    return (head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\0", b"MM\0*", b"GIF8"))
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (len(head) > 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace()))


# ----------------------------------------------------------------------------- the devkit


def read_devkit(path: Path) -> Devkit:
    """The leaf synsets (class names, num_train_images) of `data/meta.mat` and the validation
    labels of `data/ILSVRC2012_validation_ground_truth.txt`, read from the devkit's .tar.gz."""
    import numpy as np
    import scipy.io

    if not path.is_file():
        raise ArchiveError(f"{path}: missing; the devkit gives the class names and the validation labels "
                           f"(ILSVRC2012_devkit_t12.tar.gz from image-net.org, beside the image archives)")
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                for wanted in (META_MAT, VAL_TRUTH):
                    if member.isfile() and (member.name == wanted or member.name.endswith("/" + wanted)):
                        found[wanted] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ArchiveError(f"{path}: cannot read the devkit, truncated or damaged ({err})") from None
    for wanted in (META_MAT, VAL_TRUTH):
        if wanted not in found:
            raise ArchiveError(f"{path}: no {wanted} in the devkit")
    try:
        synsets = np.atleast_1d(scipy.io.loadmat(io.BytesIO(found[META_MAT]), squeeze_me=True)["synsets"])
        fields = {name: [value.item() if hasattr(value, "item") else value for value in synsets[name]]
                  for name in ("ILSVRC2012_ID", "WNID", "words", "num_children", "num_train_images")}
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise ArchiveError(f"{path}: {META_MAT}: not the devkit's synsets struct ({err!r})") from None
    leaves = [i for i, n in enumerate(fields["num_children"]) if int(n) == 0]  # as torchvision's parse_meta_mat
    idx_to_wnid = {int(fields["ILSVRC2012_ID"][i]): str(fields["WNID"][i]) for i in leaves}
    wnid_to_classes = {str(fields["WNID"][i]): tuple(str(fields["words"][i]).split(", ")) for i in leaves}
    num_train_images = {str(fields["WNID"][i]): int(fields["num_train_images"][i]) for i in leaves}
    val_wnids = []
    for number, line in enumerate(found[VAL_TRUTH].decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            val_wnids.append(idx_to_wnid[int(line)])
        except (ValueError, KeyError):
            raise ArchiveError(f"{path}: {VAL_TRUTH} line {number}: {line.strip()!r} is not the "
                               f"ILSVRC2012_ID of a class") from None
    return Devkit(wnid_to_classes, num_train_images, val_wnids)


# ----------------------------------------------------------------------------- tar headers


class Window(io.RawIOBase):
    """Bytes [start, start + size) of the open file `fd`, read with pread: a tar inside a tar."""

    def __init__(self, fd: int, start: int, size: int):
        super().__init__()
        self.fd, self.start, self.size, self.pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else self.size + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        data = os.pread(self.fd, n, self.start + self.pos) if n else b""
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def tar_members(fd: int, start: int, size: int, label: str):
    """(member, first 12 bytes) for the files of the tar at [start, start + size) of `fd`, reading
    the headers only (and each file's first bytes, in the same block); ArchiveError when the tar
    is truncated or damaged: a member that runs past the end, or no end-of-archive block after the
    last member."""
    stream = io.BufferedReader(Window(fd, start, size), 4096)  # a header and the next 3.5 KB
    try:
        tar = tarfile.open(fileobj=stream, mode="r:")
    except tarfile.TarError as err:
        raise ArchiveError(f"{label}: not a tar archive, or truncated ({err})") from None
    last = None
    try:
        while True:
            member = tar.next()
            if member is None:
                break
            tar.members.clear()  # headers only: a class's or the val tar's list would hold 50,000
            last = member.name
            end = member.offset_data + member.size
            if end > size:
                raise ArchiveError(f"{label}: truncated: {member.name} needs bytes up to {end:,} of {size:,}")
            if member.isdir():
                continue
            head = b""
            if member.isfile():
                stream.seek(member.offset_data)
                head = stream.read(min(12, member.size))
            yield member, head
    except tarfile.TarError as err:
        raise ArchiveError(f"{label}: damaged after {last} ({err})") from None
    stream.seek(tar.offset)
    end = stream.read(BLOCK)
    if len(end) < BLOCK or end.count(0) != BLOCK:
        where = f"after {last}" if last else "at its start"
        raise ArchiveError(f"{label}: truncated or damaged {where} (no end-of-archive block at byte {tar.offset:,})")


def image_member(member: tarfile.TarInfo, head: bytes, label: str) -> str:
    """The member's name, normalised; ArchiveError unless it is an image file."""
    name = posixpath.normpath(member.name).lstrip("/")
    if not member.isfile():
        raise ArchiveError(f"{label}: {member.name} is not a regular file (an image file was expected)")
    if not is_image_name(name) or not is_image_data(head):
        raise ArchiveError(f"{label}: {member.name} is not an image file ("
                           + (f"its name does not end in {'/'.join(IMG_EXTENSIONS)})" if not is_image_name(name)
                              else f"it starts with {head[:8]!r})"))
    return name


# ----------------------------------------------------------------------------- the splits


def index_train(path: Path, devkit: Devkit) -> tuple[list[Image], list[str]]:
    """The train tar's images in torchvision's order, and its classes (the class tars' wnids)."""
    if not path.is_file():
        raise ArchiveError(f"{path}: missing (pass --splits to leave the train split out)")
    per_class: dict[str, list[tuple[tuple[str, str], Image]]] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        total = os.fstat(fd).st_size
        for outer, _ in tar_members(fd, 0, total, str(path)):
            wnid, ext = posixpath.splitext(posixpath.normpath(outer.name))
            if not outer.isfile() or ext != ".tar" or "/" in wnid:
                raise ArchiveError(f"{path}: {outer.name} is not a class tar (<wnid>.tar)")
            if wnid in per_class:
                raise ArchiveError(f"{path}: {outer.name} appears twice")
            if wnid not in devkit.num_train_images:
                raise ArchiveError(f"{path}: {outer.name}: {wnid} is not a class of the devkit's {META_MAT}")
            label = f"{path}: {outer.name}"
            images, names = [], set()
            for member, head in tar_members(fd, outer.offset_data, outer.size, label):
                name = image_member(member, head, label)
                if name in names:
                    raise ArchiveError(f"{label}: {member.name} appears twice")
                names.add(name)
                folder, file = posixpath.split(name)
                # torchvision extracts to train/<wnid>/, then walks the folders sorted, files sorted
                images.append(((folder, file), Image(posixpath.join("train", wnid, name), wnid, str(path),
                                                     outer.offset_data + member.offset_data, member.size)))
            expected = devkit.num_train_images[wnid]
            if len(images) != expected:
                raise ArchiveError(f"{label}: {len(images)} images, but the devkit's num_train_images says {expected}")
            per_class[wnid] = images
    finally:
        os.close(fd)
    missing = [wnid for wnid in devkit.num_train_images if wnid not in per_class]
    if missing:
        raise ArchiveError(f"{path}: no class tar for {len(missing)} of the devkit's {len(devkit.num_train_images)} "
                           f"classes ({', '.join(missing[:3])}.tar, ...): truncated, or not this devkit's")
    wnids = sorted(per_class)
    return [image for wnid in wnids for _, image in sorted(per_class[wnid], key=lambda item: item[0])], wnids


def index_val(path: Path, devkit: Devkit) -> tuple[list[Image], list[str]]:
    """The val tar's images in torchvision's order (sorted by name, labelled by the ground truth's
    lines, then ordered by wnid and name), and its classes."""
    if not path.is_file():
        raise ArchiveError(f"{path}: missing (pass --splits to leave the val split out)")
    files = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for member, head in tar_members(fd, 0, os.fstat(fd).st_size, str(path)):
            name = image_member(member, head, str(path))
            if "/" in name:
                raise ArchiveError(f"{path}: {member.name} is in a folder; the val tar holds its images directly")
            files.append((name, member.offset_data, member.size))
    finally:
        os.close(fd)
    files.sort()
    if len({name for name, _, _ in files}) != len(files):
        raise ArchiveError(f"{path}: a file name appears twice")
    if len(files) != len(devkit.val_wnids):
        raise ArchiveError(f"{path}: {len(files)} images, but the devkit's {VAL_TRUTH} has {len(devkit.val_wnids)} "
                           "lines (one label an image)")
    images = [Image(f"val/{wnid}/{name}", wnid, str(path), offset, size)
              for (name, offset, size), wnid in zip(files, devkit.val_wnids)]
    images.sort(key=lambda image: (image.wnid, image.name))
    return images, sorted(set(devkit.val_wnids))


def check_md5(path: Path) -> None:
    """ArchiveError unless `path` has the MD5 sum of ImageNet's file of its name (reads it all)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != MD5[path.name]:
        raise ArchiveError(f"{path}: MD5 {digest.hexdigest()}, not ImageNet's {MD5[path.name]}: damaged, or not "
                           "ImageNet's file (leave out --check-md5 to read it anyway)")


def index_archives(root: Path, splits: list[str], md5: bool = False) -> ArchiveIndex:
    """Index the archives of `splits` in `root` (headers only; with `md5`, each file's MD5 first)."""
    paths = [root / DEVKIT] + [root / ARCHIVES[split] for split in splits]
    if md5:
        for path in paths:
            if path.is_file():
                check_md5(path)
    devkit = read_devkit(root / DEVKIT)
    images, wnids = {}, {}
    for split in splits:
        index = index_train if split == "train" else index_val
        images[split], wnids[split] = index(root / ARCHIVES[split], devkit)
    return ArchiveIndex(devkit, images, wnids)

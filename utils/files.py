"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator


class WriteError(OSError):
    """A file that could not be written (a full disk, say); the message names it in one line."""


def write_error(path: Path, err: OSError) -> WriteError:
    """`err`, raised while writing `path`, as a WriteError naming the file, the reason and the space
    left on its disk."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    try:
        free = f"; {shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    return WriteError(f"could not write {path}: {reason}{free}")


@contextlib.contextmanager
def atomic_write(path: Path, temporary: Path) -> Iterator[BinaryIO]:
    """Open `temporary` (in `path`'s folder) for writing in binary; when the block ends, flush and
    fsync it and rename it to `path`. When the block fails or is interrupted, `temporary` is
    removed instead and `path` stays as it was."""
    try:
        with open(temporary, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """`data` to `path` through `atomic_write`, with the temporary file `.NAME.tmp` beside it;
    WriteError, naming `path`, when the file cannot take it (a full disk)."""
    try:
        with atomic_write(path, path.with_name(f".{path.name}.tmp")) as f:
            f.write(data)
    except OSError as err:
        raise write_error(path, err) from None


def write_text_atomic(path: Path, text: str) -> None:
    """`write_bytes_atomic` of `text`, UTF-8 encoded."""
    write_bytes_atomic(path, text.encode())

"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator


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

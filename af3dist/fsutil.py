"""Outputs appear whole or not at all: files and folders are built aside and moved into place in one rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def building_folder(dst: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `dst`; on success it replaces `dst`, on error it is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def building_file(dst: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `dst` to write; on success it replaces `dst`, on error it is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str, text: str) -> None:
    """Write a text file whole or not at all: local paths via a temp file and a rename; URLs (s3://, ...)
    through fsspec, whose object stores publish an object only when its upload completes."""
    if "://" in path:
        import fsspec

        with fsspec.open(path, "w") as f:
            f.write(text)
        return
    with building_file(path) as tmp:
        tmp.write_text(text)

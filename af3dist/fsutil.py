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
    """Yield a temp folder beside `dst`; on success it replaces `dst`, on error it is removed.

    The old folder is renamed aside, the new one renamed in, and only then is the old one deleted: a kill at
    any point leaves `dst` whole (old or new), or, between the two renames, the old one under `.<name>.old-*`,
    which the next build puts back first."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _restore_aside(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        aside = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if dst.exists():
            os.replace(dst, aside)
        os.replace(tmp, dst)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore_aside(dst: Path) -> None:
    """Put back an old folder that a killed swap left aside (`dst` missing, `.<name>.old-<pid>` present)."""
    asides = sorted(dst.parent.glob(f".{dst.name}.old-*"))
    if not dst.exists() and asides:
        os.replace(asides[-1], dst)
        asides = asides[:-1]
    for leftover in asides:
        shutil.rmtree(leftover, ignore_errors=True)


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

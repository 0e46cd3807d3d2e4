"""Where af3dist reads and writes: local paths and URLs (s3://, gs://, hf://, memory://, ...) through one layer.

Every "is this a URL?" question in af3dist is `is_remote` here, and every output that must appear whole goes
through one writer with one durability policy:
- local files are built beside their destination under a dot-prefixed temp name, flushed to disk (fsync),
  then renamed into place: a reader or a crash sees the old file or the new one, never half of one;
- folders are built aside the same way and swapped in by two renames (`building_folder`);
- on an object store a file is one upload, which the store publishes only when it completes, and a folder
  is uploaded file by file with its marker file (`copy_folder(..., last=...)`) written last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def is_remote(location: str | os.PathLike) -> bool:
    """Whether `location` is a URL (any `scheme://...`, file:// included) rather than a plain local path."""
    return "://" in str(location)


def scheme(location: str) -> str:
    """The URL scheme of `location`, lowercased; "file" for a plain local path."""
    return location.split("://", 1)[0].lower() if is_remote(location) else "file"


def strip_scheme(location: str) -> str:
    """`location` without its `scheme://` (a plain path is returned unchanged)."""
    return location.split("://", 1)[1] if is_remote(location) else location


def join(base: str, *parts: str) -> str:
    """`base`/`parts...`: a URL joined with '/', a local path with the OS's rules."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def absolute(location: str) -> str:
    """A local path made absolute (`~` and `$VARS` expanded: Ray workers run in other directories); a URL
    unchanged."""
    if is_remote(location):
        return location
    return os.path.abspath(os.path.expanduser(os.path.expandvars(location)))


def filesystem(location: str) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) for `location`."""
    import fsspec

    return fsspec.core.url_to_fs(location)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.exists(path)


def open_file(location: str, mode: str = "rb") -> IO:
    """`location` opened through fsspec (local paths too). Writers that must appear whole use `write_bytes`."""
    fs, path = filesystem(location)
    return fs.open(path, mode)


def write_bytes(location: str, data: bytes) -> str:
    """Put `data` at `location`, whole or not at all and on disk before it is visible (see the module
    docstring); parent folders are made. Returns `location`."""
    if is_remote(location):
        fs, path = filesystem(location)
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)
        return location
    with building_file(location) as tmp:
        tmp.write_bytes(data)
    return location


def write_text(location: str, text: str) -> str:
    """`write_bytes` of `text` in UTF-8."""
    return write_bytes(location, text.encode())


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def building_file(dst: str | Path) -> Iterator[Path]:
    """Yield a temp path beside local `dst` to write (by any means); on success it is flushed to disk and
    renamed onto `dst`, on error removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync(tmp)  # the rename must not publish a file whose bytes are not on disk yet
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def building_folder(dst: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside local `dst`; on success its files are flushed to disk and it replaces `dst`,
    on error it is removed.

    The old folder is renamed aside, the new one renamed in, and only then is the old one deleted: a kill at
    any point leaves `dst` whole (old or new), or, between the two renames, the old one under `.<name>.old-*`,
    which the next build puts back first."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _restore_aside(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                _fsync(path)
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


def copy_folder(src: str | Path, dst: str, last: str | None = None) -> str:
    """Copy local folder `src` to `dst`. Locally: built aside and swapped in whole (`building_folder`). To a
    URL: file by file, each one upload, with the file named `last` (a marker readers look for, such as
    adapter_config.json) uploaded after all the others, so that a reader who finds it finds the rest."""
    src = Path(src)
    if not is_remote(dst):
        with building_folder(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return dst
    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: p.relative_to(src).as_posix() == last)
    for path in files:
        write_bytes(join(dst, *path.relative_to(src).parts), path.read_bytes())
    return dst

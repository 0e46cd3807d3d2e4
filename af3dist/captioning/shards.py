"""The output of a captioning run: shards that appear whole or not at all, and what they already hold.

Shards are `part-<run>-<seq>.parquet` (or `.jsonl`) in the output folder, local or any fsspec URL. On local
disk a shard is written under a dot-prefixed temp name (`fsutil.building_file`) and renamed into place,
after an fsync; on object stores it is one
upload, which becomes visible only when complete. Readers take `part-*` files only, so a run killed midway
leaves finished shards and, at worst, a temp file that nothing reads (and the next run removes).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from af3dist.fsutil import building_file

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("caption", pa.string()), ("duration_s", pa.float32()),
    ("model", pa.string()), ("prompt", pa.string()), ("error", pa.string()),
])
OUTPUT_COLUMNS = OUTPUT_SCHEMA.names
FORMATS = ("parquet", "jsonl")
SHARD_PREFIX = "part-"
SUMMARY_FILE = "_summary.json"


def is_temp(name: str) -> bool:
    """A file `fsutil.building_file` was writing (`.<name>.tmp-<pid>`) when its run was killed."""
    return name.startswith(f".{SHARD_PREFIX}") and ".tmp-" in name


def is_shard(name: str) -> bool:
    """A finished shard's file name (temp files start with a dot and never match)."""
    return name.startswith(SHARD_PREFIX) and name.endswith(tuple(f".{f}" for f in FORMATS))


def _fs(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(output)
    return fs, root.rstrip("/")


def list_shards(output: str) -> list[str]:
    """Finished shards in `output`, sorted (empty when the folder does not exist)."""
    fs, root = _fs(output)
    if not fs.isdir(root):
        return []
    return sorted(p for p in fs.ls(root, detail=False) if is_shard(posixpath.basename(p)))


def _read_shard(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as f:
        if path.endswith(".parquet"):
            return pq.read_table(f, columns=columns)
        rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    return table.select(columns) if columns else table


def read_output(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every finished shard of `output` as one table (the OUTPUT_SCHEMA columns, or `columns`)."""
    fs, _ = _fs(output)
    tables = [_read_shard(fs, p, columns) for p in list_shards(output)]
    if not tables:
        schema = OUTPUT_SCHEMA if columns is None else pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)


def read_done_ids(output: str) -> list[str]:
    """Ids already in the output, with repeats if any (a resume skips them; a check counts them)."""
    return read_output(output, ["id"])["id"].to_pylist()


def remove_temp_files(output: str) -> int:
    """Delete temp files left by a killed run; returns how many there were. One run per output at a time."""
    fs, root = _fs(output)
    if not fs.isdir(root):
        return 0
    stale = [p for p in fs.ls(root, detail=False) if is_temp(posixpath.basename(p))]
    for p in stale:
        fs.rm(p)
    return len(stale)


def encode_shard(rows: list[dict], fmt: str) -> bytes:
    """Rows (dicts with the OUTPUT_COLUMNS) as the bytes of one shard file."""
    if fmt == "jsonl":
        return "".join(json.dumps({c: r.get(c) for c in OUTPUT_COLUMNS}) + "\n" for r in rows).encode()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def write_atomic(output: str, name: str, data: bytes) -> str:
    """Put `data` at `output/name` so that it is never visible half written; returns the full path."""
    fs, root = _fs(output)
    fs.makedirs(root, exist_ok=True)
    final = f"{root}/{name}"
    if isinstance(fs, LocalFileSystem):
        with building_file(final) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not publish a shard whose bytes are not on disk yet
    else:  # object stores: a single upload is atomic
        fs.pipe_file(final, data)
    return final


class ShardWriter:
    """Buffers output rows and writes a shard every `shard_rows` rows or `flush_seconds`, whichever is first."""

    def __init__(self, output: str, fmt: str = "parquet", shard_rows: int = 1000, flush_seconds: float = 60.0,
                 run_id: str | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.output, self.fmt, self.shard_rows, self.flush_seconds = output, fmt, shard_rows, flush_seconds
        self.run_id = run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.buffer: list[dict] = []
        self.shards: list[str] = []
        self.rows_written = 0
        self._last_flush = time.monotonic()

    def add(self, rows: Iterable[dict]) -> None:
        self.buffer.extend(rows)
        while len(self.buffer) >= self.shard_rows:
            self._write(self.buffer[: self.shard_rows])
            self.buffer = self.buffer[self.shard_rows:]
        if self.buffer and time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self._write(self.buffer)
            self.buffer = []

    def _write(self, rows: list[dict]) -> None:
        name = f"{SHARD_PREFIX}{self.run_id}-{len(self.shards):05d}.{self.fmt}"
        self.shards.append(write_atomic(self.output, name, encode_shard(rows, self.fmt)))
        self.rows_written += len(rows)
        self._last_flush = time.monotonic()

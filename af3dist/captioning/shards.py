"""The output of a captioning run: shards that appear whole or not at all, and what they already hold.

Shards are `part-<run>-<seq>.parquet` (or `.jsonl`) in the output folder, local or any fsspec URL. On local
disk a shard is written under a dot-prefixed temp name (`storage.write_bytes`) and renamed into place,
after an fsync; on object stores it is one
upload, which becomes visible only when complete. Readers take `part-*` files only, so a run killed midway
leaves finished shards and, at worst, a temp file that nothing reads (and the next run removes, holding the
output's lock: `af3dist.captioning.lock`).

A row is one attempt at an id. A retried id (`--retry-errors`) gets a new row in a new shard; the reader
keeps one row per id, the latest attempt: a captioned row wins over an error row, and among rows of the
same kind the one in the later shard (shard names sort by run start) wins. `compact_output` then rewrites
the shards that hold superseded rows without them (each rewrite atomic), so the files themselves hold every
id once again; a run killed between the two steps leaves an extra row that readers already ignore and that
the next run removes.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from af3dist import storage

if TYPE_CHECKING:
    from af3dist.captioning.lock import OutputLock

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("caption", pa.string()), ("duration_s", pa.float32()),
    ("model", pa.string()), ("prompt", pa.string()), ("error", pa.string()),
])
OUTPUT_COLUMNS = OUTPUT_SCHEMA.names
FORMATS = ("parquet", "jsonl")
SHARD_PREFIX = "part-"
SUMMARY_FILE = "_summary.json"


def is_temp(name: str) -> bool:
    """A file `storage.building_file` was writing (`.<name>.tmp-<pid>`) when its run was killed."""
    return name.startswith(f".{SHARD_PREFIX}") and ".tmp-" in name


def is_shard(name: str) -> bool:
    """A finished shard's file name (temp files start with a dot and never match)."""
    return name.startswith(SHARD_PREFIX) and name.endswith(tuple(f".{f}" for f in FORMATS))


def output_fs(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of an output folder and the folder's path on it (no trailing slash)."""
    fs, root = fsspec.core.url_to_fs(output)
    return fs, root.rstrip("/")


def list_shards(output: str) -> list[str]:
    """Finished shards in `output`, sorted (empty when the folder does not exist)."""
    fs, root = output_fs(output)
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


def _attempts(output: str, columns: list[str] | None) -> tuple[pa.Table, list[str]]:
    """Every stored row (the wanted columns plus id and error) with its shard's index in `_shard`, in
    shard order, and the shard paths."""
    fs, _ = output_fs(output)
    shards = list_shards(output)
    read = None if columns is None else list(dict.fromkeys([*columns, "id", "error"]))
    tables = []
    for k, path in enumerate(shards):
        table = _read_shard(fs, path, read)
        tables.append(table.append_column("_shard", pa.array(np.full(table.num_rows, k, np.int32))))
    if not tables:
        schema = OUTPUT_SCHEMA if read is None else pa.schema([OUTPUT_SCHEMA.field(c) for c in read])
        return schema.empty_table().append_column("_shard", pa.array([], pa.int32())), shards
    return pa.concat_tables(tables), shards


def latest_mask(table: pa.Table) -> pa.BooleanArray:
    """Which rows of `table` (with id, error, _shard, in shard order) are their id's latest attempt: a
    captioned row beats an error row, then the later shard, then the later row."""
    n = table.num_rows
    if n == 0 or pc.count_distinct(table["id"]).as_py() == n:
        return pa.array(np.ones(n, bool))
    ok = pc.is_null(table["error"]).to_numpy(zero_copy_only=False).astype(np.int64)
    rank = ok * (1 << 40) + np.arange(n, dtype=np.int64)  # the row position already orders shards, then rows
    ranked = pa.table({"id": table["id"], "rank": rank})
    best = ranked.group_by("id").aggregate([("rank", "max")])["rank_max"]
    return pc.is_in(ranked["rank"], value_set=best)


def read_output(output: str, columns: list[str] | None = None, *, latest: bool = True) -> pa.Table:
    """Every finished shard of `output` as one table (the OUTPUT_SCHEMA columns, or `columns`): one row
    per id, its latest attempt (see the module docstring), or with `latest=False` every row as stored."""
    table, _ = _attempts(output, columns)
    if latest:
        table = table.filter(latest_mask(table))
    return table.select(columns or OUTPUT_COLUMNS)


def read_done_ids(output: str) -> list[str]:
    """Ids in the output's files, with repeats if any (a check counts them; `read_output` hides them)."""
    return read_output(output, ["id"], latest=False)["id"].to_pylist()


def _require_lock(output: str, lock: "OutputLock") -> None:
    if not (lock.held and lock.output == output):
        raise RuntimeError(f"changing the files of {output} needs its lock (af3dist.captioning.lock.OutputLock)")


def remove_temp_files(output: str, lock: "OutputLock") -> int:
    """Delete temp files left by a killed run; returns how many there were. Only under the output's lock:
    a temp file of a live run is that run's shard being written."""
    _require_lock(output, lock)
    fs, root = output_fs(output)
    if not fs.isdir(root):
        return 0
    stale = [p for p in fs.ls(root, detail=False) if is_temp(posixpath.basename(p))]
    for p in stale:
        fs.rm(p)
    return len(stale)


def compact_output(output: str, lock: "OutputLock") -> int:
    """Rewrite the shards that hold superseded attempts without them (a shard left empty is deleted);
    returns how many rows were removed. Only under the output's lock."""
    _require_lock(output, lock)
    table, shards = _attempts(output, ["id", "error"])
    keep = latest_mask(table).to_numpy(zero_copy_only=False)
    shard_of = table["_shard"].to_numpy()
    fs, _ = output_fs(output)
    for k in np.unique(shard_of[~keep]):
        path, rows = shards[k], keep[shard_of == k]  # a shard's rows, in file order
        if not rows.any():
            fs.rm(path)
            continue
        kept = _read_shard(fs, path).filter(pa.array(rows))
        write_atomic(output, posixpath.basename(path), encode_shard(kept.to_pylist(), path.rsplit(".", 1)[-1]))
    return int((~keep).sum())


def encode_shard(rows: list[dict], fmt: str) -> bytes:
    """Rows (dicts with the OUTPUT_COLUMNS) as the bytes of one shard file."""
    if fmt == "jsonl":
        return "".join(json.dumps({c: r.get(c) for c in OUTPUT_COLUMNS}) + "\n" for r in rows).encode()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def write_atomic(output: str, name: str, data: bytes) -> str:
    """Put `data` at `output/name` so that it is never visible half written; returns the full path."""
    fs, root = output_fs(output)
    final = f"{root}/{name}"
    # on the output's own filesystem path (protocol stripped, as the other shard functions list them)
    storage.write_bytes(storage.join(output, name), data)
    return final


class ShardWriter:
    """Buffers output rows and writes a shard every `shard_rows` rows or `flush_seconds`, whichever is first."""

    def __init__(self, output: str, fmt: str = "parquet", shard_rows: int = 1000, flush_seconds: float = 60.0,
                 run_id: str | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.output, self.fmt, self.shard_rows, self.flush_seconds = output, fmt, shard_rows, flush_seconds
        # shard names sort by run start (to the microsecond): the later of two attempts at an id wins
        self.run_id = run_id or datetime.now().strftime("%Y%m%d-%H%M%S%f") + "-" + uuid.uuid4().hex[:6]
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

"""What to caption: ids and locations of every input, listed in the driver without reading any audio.

Three kinds of input, local or behind any fsspec URL:
  - a folder (searched recursively for audio extensions) or a glob of audio files; the id is the path
    relative to the folder (or to the glob's fixed prefix);
  - a manifest, CSV or JSONL, with an `id` and a path/URI per line (relative paths are relative to the
    manifest); a line without an id uses its path as id;
  - parquet with an `audio` struct column {bytes, path}: the AudioCaps layout (a folder with
    `data/<split>-NNNNN-of-MMMMM.parquet`, pick the split with `split`), any folder or glob of parquet files,
    or one file. AudioCaps rows are identified by clip, `<youtube_id>_<start_time>` (validation and test
    repeat a clip on five rows, one per reference caption), other parquet by an `id` column.
Ids are unique in a plan: a repeated id is counted as a duplicate and captioned once.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from af3dist.data.source import SplitFiles, clip_key, split_files

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".au",
                    ".wma", ".webm")
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".ndjson")
PATH_KEYS = ("path", "uri", "url", "file", "audio_path", "audio")
_GLOB_CHARS = "*?["


@dataclass
class InputPlan:
    """Every input of a run, in order. For files, `locations` are what the read tasks open; for parquet,
    the rows are read from `parquet` and `row_keys` name the one row to caption per id."""

    kind: str  # "files" or "parquet"
    source: str
    ids: list[str]
    paths: list[str]  # files: shown in the output's `path` column (parquet: taken from audio.path when read)
    locations: list[str] = field(default_factory=list)  # files: absolute path or URL per id
    row_keys: list = field(default_factory=list)  # parquet: value of `key_column` of each id's row
    key_column: str | None = None  # parquet: "audiocap_id" (AudioCaps layout) or "id"
    parquet: SplitFiles | None = None
    row_groups: list[tuple[str, int]] = field(default_factory=list)  # parquet: (path, row group) read units
    duplicates: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A location a worker can open with fsspec: a plain path on local disk, a full URL elsewhere."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _dedupe(ids: list[str], *columns: list) -> tuple[list[str], list[list], int]:
    seen: set[str] = set()
    keep = [i for i, x in enumerate(ids) if not (x in seen or seen.add(x))]
    return [ids[i] for i in keep], [[c[i] for i in keep] for c in columns], len(ids) - len(keep)


def _audio_files(fs: fsspec.AbstractFileSystem, root: str) -> tuple[str, list[str]]:
    """(base, files): every file under a folder, or matching a glob, with an audio extension."""
    if any(c in root for c in _GLOB_CHARS):
        base = root[: min(root.find(c) for c in _GLOB_CHARS if c in root)].rsplit("/", 1)[0]
        files = [p for p in fs.glob(root) if not fs.isdir(p)]
    else:
        base = root
        files = fs.find(root)
    return base, sorted(p for p in files if p.lower().endswith(AUDIO_EXTENSIONS))


def _plan_files(source: str, fs: fsspec.AbstractFileSystem, base: str, files: list[str]) -> InputPlan:
    base = base.rstrip("/")
    ids = [posixpath.relpath(p, base) if base else p for p in files]
    return InputPlan("files", source, ids, paths=ids, locations=[_url(fs, p) for p in files])


def _manifest_rows(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    if path.lower().endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
            if not isinstance(rows[-1], dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rows[-1]).__name__}")
    return rows


def _plan_manifest(source: str, fs: fsspec.AbstractFileSystem, path: str) -> InputPlan:
    rows = _manifest_rows(fs, path)
    keys = {k for r in rows for k in r}
    path_key = next((k for k in PATH_KEYS if k in keys), None)
    if rows and path_key is None and "id" not in keys:
        raise ValueError(f"manifest {source!r} has neither an id nor a path column (looked for id, "
                         f"{', '.join(PATH_KEYS)}; found {', '.join(sorted(keys))})")
    folder = posixpath.dirname(path)
    ids, paths, locations = [], [], []
    for r in rows:
        where = str(r.get(path_key) or "").strip() if path_key else ""
        ids.append(str(r.get("id") if r.get("id") not in (None, "") else where))
        paths.append(where)
        if not where:
            locations.append("")  # read as missing_audio
        elif "://" in where:
            locations.append(where)
        else:
            full = where if where.startswith("/") else posixpath.join(folder, where)
            locations.append(_url(fs, posixpath.normpath(full)))
    ids, (paths, locations), dups = _dedupe(ids, paths, locations)
    return InputPlan("files", source, ids, paths=paths, locations=locations, duplicates=dups)


def _plan_parquet(source: str, files: SplitFiles) -> InputPlan:
    """Ids from the key columns only (the audio column is not read here)."""
    ids, keys, row_groups = [], [], []
    key_column = None
    for path in files.paths:
        with files.filesystem.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            row_groups.extend((path, g) for g in range(pf.num_row_groups))
            names = set(pf.schema_arrow.names)
            if "audio" not in names:
                raise ValueError(f"{path}: parquet input needs an `audio` column (struct of bytes and path)")
            if {"youtube_id", "start_time", "audiocap_id"} <= names:
                key_column = "audiocap_id"
                table = pf.read(columns=["youtube_id", "start_time", "audiocap_id"])
                ids.extend(clip_key(y, s) for y, s in zip(table["youtube_id"].to_pylist(),
                                                         table["start_time"].to_pylist()))
            elif "id" in names:
                key_column = "id"
                table = pf.read(columns=["id"])
                ids.extend(str(i) for i in table["id"].to_pylist())
            else:
                raise ValueError(f"{path}: parquet input needs an `id` column or the AudioCaps columns "
                                 f"youtube_id, start_time and audiocap_id")
        keys.extend(table[key_column].to_pylist())
    ids, (keys,), dups = _dedupe(ids, keys)
    return InputPlan("parquet", source, ids, paths=[], row_keys=keys, key_column=key_column, parquet=files,
                     row_groups=row_groups, duplicates=dups)


def plan_inputs(source: str, split: str | None = None) -> InputPlan:
    """List every input of `source` (see the module docstring); raises FileNotFoundError when there is none."""
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/") or "/"
    lower = root.lower()
    if split is not None:
        return _plan_parquet(source, split_files(source, split))
    if lower.endswith(MANIFEST_EXTENSIONS):
        return _plan_manifest(source, fs, root)
    if lower.endswith(".parquet"):
        paths = sorted(fs.glob(root)) if any(c in root for c in _GLOB_CHARS) else [root]
        return _plan_parquet(source, SplitFiles(source, "", fs, paths))
    if not any(c in root for c in _GLOB_CHARS) and fs.isfile(root):
        return _plan_files(source, fs, posixpath.dirname(root), [root])
    if not any(c in root for c in _GLOB_CHARS) and not fs.isdir(root):
        raise FileNotFoundError(f"input {source!r} does not exist")
    base, files = _audio_files(fs, root)
    if files:
        return _plan_files(source, fs, base, files)
    parquet = sorted(p for p in fs.find(root) if p.endswith(".parquet")) if fs.isdir(root) else []
    if parquet:
        return _plan_parquet(source, SplitFiles(source, "", fs, parquet))
    raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) and no parquet files in {source!r}")

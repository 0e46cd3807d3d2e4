"""What to caption: ids and locations of every input, listed in the driver without reading any audio.

Three kinds of input, local or behind any fsspec URL:
  - a folder (searched recursively for audio extensions) or a glob of audio files; the id is the path
    relative to the folder (for a glob, the folder the glob starts in: `DIR/**/*.wav` gives the ids of
    `DIR`). The input is normalised first (absolute, no trailing slash, `.` and `..` resolved), so `DIR`,
    `DIR/`, `./DIR`, `file://DIR` and `DIR/**/*.wav` give the same ids for the same files;
  - a manifest, CSV or JSONL, with an `id` and a path/URI per line (relative paths are relative to the
    manifest); a line without an id uses its path as id. A URL must use the manifest's own protocol
    (`s3://` entries in an `s3://` manifest, `file://` in a local one): any other scheme (http://, another
    store) is refused up front, so a manifest cannot make the workers fetch from arbitrary servers;
  - parquet with an `audio` struct column {bytes, path}: the AudioCaps layout (a folder with
    `data/<split>-NNNNN-of-MMMMM.parquet`, pick the split with `split`), any folder or glob of parquet files,
    or one file. AudioCaps rows are identified by clip, `<youtube_id>_<start_time>` (validation and test
    repeat a clip on five rows, one per reference caption), other parquet by an `id` column.
Ids are unique in a plan: a repeated id is counted as a duplicate and captioned once.
An output folder inside the folder an input is listed from is refused (`check_output_outside_input`): its
shards would be read back as input.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from af3dist import storage
from af3dist.config import ConfigError
from af3dist.data.source import SplitFiles, clip_key, split_files

# Every container the FFmpeg-based decoder (`af3dist.data.audio`) reads, by file name (case-insensitive).
AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".w64", ".rf64", ".bwf",  # RIFF / Sony Wave64 / RF64 / broadcast wave
    ".flac", ".wv", ".ape", ".tta",  # lossless
    ".mp3", ".mp2", ".mp1", ".mpga",  # MPEG audio
    ".ogg", ".oga", ".opus", ".spx",  # Ogg: Vorbis, Opus, Speex
    ".webm", ".weba", ".mka",  # Matroska / WebM
    ".m4a", ".mp4", ".m4b", ".m4r", ".3gp", ".3ga", ".aac", ".adts",  # MP4 family (AAC, ALAC) and raw AAC
    ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf",  # Apple / Sun
    ".amr", ".awb", ".ac3", ".eac3", ".dts", ".wma", ".voc",
)
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


def _has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def _glob_base(pattern: str) -> str:
    """The folder a glob starts in: everything before the first path segment with a wildcard."""
    return pattern[: min(pattern.find(c) for c in _GLOB_CHARS if c in pattern)].rsplit("/", 1)[0]


def locate(source: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of an input and its normalised path on it: absolute (local), no trailing slash, no
    `.`/`..` segments or doubled slashes. Every id is computed from this, never from the spelling."""
    fs, root = fsspec.core.url_to_fs(source)
    if isinstance(fs, LocalFileSystem):
        root = os.path.abspath(root)
    root = posixpath.normpath(root) if root else root
    return fs, (root.rstrip("/") or "/")


def _audio_files(fs: fsspec.AbstractFileSystem, root: str) -> tuple[str, list[str]]:
    """(base, files): every file under a folder, or matching a glob, with an audio extension."""
    if _has_glob(root):
        base = _glob_base(root)
        files = [p for p in fs.glob(root) if not fs.isdir(p)]
    else:
        base = root
        files = fs.find(root)
    return base, sorted(p for p in files if p.lower().endswith(AUDIO_EXTENSIONS))


def _plan_files(source: str, fs: fsspec.AbstractFileSystem, base: str, files: list[str]) -> InputPlan:
    base = base.rstrip("/")
    ids = [posixpath.relpath(p, base) if base else p for p in files]
    return InputPlan("files", source, ids, paths=ids, locations=[_url(fs, p) for p in files])


def _manifest_rows(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[int, dict]]:
    """(line number, row) of every row of a CSV or JSONL manifest."""
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    if path.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        return [(reader.line_num, row) for row in reader]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    return rows


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _manifest_location(fs: fsspec.AbstractFileSystem, folder: str, where: str) -> str | None:
    """Where a worker reads a manifest entry: relative paths are relative to the manifest; a URL of the
    manifest's own protocol is read on that filesystem; None for a URL of any other scheme."""
    if storage.is_remote(where):
        if storage.scheme(where) not in _protocols(fs):
            return None
        where = fsspec.core.strip_protocol(where)
    full = where if where.startswith("/") else posixpath.join(folder, where)
    return _url(fs, posixpath.normpath(full))


def _plan_manifest(source: str, fs: fsspec.AbstractFileSystem, path: str) -> InputPlan:
    rows = _manifest_rows(fs, path)
    keys = {k for _, r in rows for k in r}
    path_key = next((k for k in PATH_KEYS if k in keys), None)
    if rows and path_key is None and "id" not in keys:
        raise ValueError(f"manifest {source!r} has neither an id nor a path column (looked for id, "
                         f"{', '.join(PATH_KEYS)}; found {', '.join(sorted(keys))})")
    folder = posixpath.dirname(path)
    ids, paths, locations, foreign = [], [], [], []
    for line, r in rows:
        where = str(r.get(path_key) or "").strip() if path_key else ""
        ids.append(str(r.get("id") if r.get("id") not in (None, "") else where))
        paths.append(where)
        location = _manifest_location(fs, folder, where) if where else ""  # "" is read as missing_audio
        if location is None:
            foreign.append(f"line {line}: {where!r}")
        locations.append(location)
    if foreign:
        raise ConfigError(f"manifest {source!r}: {len(foreign)} entries use a URL scheme other than the "
                          f"manifest's own ({', '.join(_protocols(fs))}) and are refused: "
                          f"{'; '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}. List local paths "
                          f"(relative to the manifest) or URLs on the manifest's own filesystem")
    ids, (paths, locations), dups = _dedupe(ids, paths, locations)
    return InputPlan("files", source, ids, paths=paths, locations=locations, duplicates=dups)


def _plan_parquet(source: str, files: SplitFiles) -> InputPlan:
    """Ids from the key columns only (the audio column is not read here)."""
    ids, keys, row_groups = [], [], []
    key_column = None
    for path in files.paths:
        if isinstance(files.filesystem, LocalFileSystem) and not os.path.isfile(path):  # stat only, no open
            raise ConfigError(f"{path}: parquet input is not a regular file (a FIFO, device or socket would "
                              f"block or never end)")
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


def listed_folder(source: str, split: str | None = None) -> str | None:
    """The normalised folder an input's files are listed from (a folder, a glob's starting folder, an
    AudioCaps layout), or None for inputs that name their files (a manifest, one file)."""
    fs, root = locate(source)
    if split is not None:
        return root
    if root.lower().endswith(MANIFEST_EXTENSIONS):
        return None
    if _has_glob(root):
        return _glob_base(root) or "/"
    return None if fs.isfile(root) else root


def _real(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else path


def check_output_outside_input(source: str, output: str, split: str | None = None) -> None:
    """ConfigError when `output` is (inside) the folder `source` is listed from: the run's own shards would
    be read back as input (parquet) or the folder would mix inputs and outputs."""
    folder = listed_folder(source, split)
    if folder is None:
        return
    in_fs, _ = locate(source)
    out_fs, out = locate(output)
    if _protocols(in_fs) != _protocols(out_fs):
        return
    inside, out_real = _real(in_fs, folder), _real(out_fs, out)
    if out_real == inside or out_real.startswith(inside.rstrip("/") + "/"):
        raise ConfigError(f"output {output!r} is inside the input folder {folder!r} (input {source!r}): its "
                          f"shards would be read back as input. Choose an output folder outside the input")


def plan_inputs(source: str, split: str | None = None) -> InputPlan:
    """List every input of `source` (see the module docstring); raises FileNotFoundError when there is none."""
    fs, root = locate(source)
    lower = root.lower()
    if split is not None:
        return _plan_parquet(source, split_files(source, split))
    if lower.endswith(MANIFEST_EXTENSIONS):
        return _plan_manifest(source, fs, root)
    if lower.endswith(".parquet"):
        paths = sorted(fs.glob(root)) if _has_glob(root) else [root]
        return _plan_parquet(source, SplitFiles(source, "", fs, paths))
    if not _has_glob(root) and fs.isfile(root):
        return _plan_files(source, fs, posixpath.dirname(root), [root])
    if not _has_glob(root) and not fs.isdir(root):
        raise FileNotFoundError(f"input {source!r} does not exist")
    base, files = _audio_files(fs, root)
    if files:
        return _plan_files(source, fs, base, files)
    parquet = sorted(p for p in fs.find(root) if p.endswith(".parquet")) if fs.isdir(root) else []
    if parquet:
        return _plan_parquet(source, SplitFiles(source, "", fs, parquet))
    raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) and no parquet files in {source!r}")

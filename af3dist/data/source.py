"""Find AudioCaps-layout parquet shards in a local folder, any fsspec URL or the Hugging Face hub.

One code path for all three: `fsspec.core.url_to_fs` picks the filesystem (local, s3fs, gcsfs, or
huggingface_hub's HfFileSystem for hf://datasets/...), the shards are globbed as
`<root>/data/<split>-NNNNN-of-MMMMM.parquet`, and Ray Data reads them through pyarrow, streaming.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem
import pyarrow.parquet as pq

AUDIOCAPS_COLUMNS = ["audio", "caption", "audiocap_id", "youtube_id", "start_time"]
METADATA_COLUMNS = ["caption", "audiocap_id", "youtube_id", "start_time"]


@dataclass(frozen=True)
class SplitFiles:
    """The shards of one split and the filesystem that reads them."""

    source: str
    split: str
    filesystem: fsspec.AbstractFileSystem
    paths: list[str]

    def arrow_filesystem(self) -> pafs.FileSystem:
        """A pyarrow filesystem for Ray Data: native for local disk, fsspec-backed for everything else."""
        if isinstance(self.filesystem, LocalFileSystem):
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.filesystem))


def split_files(source: str, split: str) -> SplitFiles:
    """Resolve `source` (path or URL) and list the split's shards, sorted; a clear error when there are none."""
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/")
    pattern = f"{root}/data/{split}-*-of-*.parquet"
    paths = sorted(fs.glob(pattern))
    if not paths:
        raise FileNotFoundError(
            f"no shards for split {split!r} in {source!r} (looked for {pattern} on {type(fs).__name__}); "
            f"expected the OpenSound/AudioCaps layout data/{split}-NNNNN-of-MMMMM.parquet"
        )
    return SplitFiles(source=source, split=split, filesystem=fs, paths=paths)


def count_rows(source: str, split: str) -> int:
    """Rows in a split, from the parquet footers only (no data is read)."""
    files = split_files(source, split)
    total = 0
    for path in files.paths:
        with files.filesystem.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def clip_key(youtube_id: str, start_time: int) -> str:
    """Clips are identified by (youtube_id, start_time): audiocap_id is unique per caption, not per clip."""
    return f"{youtube_id}_{int(start_time)}"


def read_references(source: str, split: str) -> dict[str, dict]:
    """Every clip of a split with all its reference captions, read without the audio column.

    Returns {clip_key: {"first_id": audiocap_id of the clip's first row, "references": [captions]}}.
    """
    files = split_files(source, split)
    clips: dict[str, dict] = defaultdict(lambda: {"first_id": None, "references": []})
    for path in files.paths:
        with files.filesystem.open(path, "rb") as f:
            table = pq.read_table(f, columns=METADATA_COLUMNS)
        for row in table.to_pylist():
            clip = clips[clip_key(row["youtube_id"], row["start_time"])]
            if clip["first_id"] is None:
                clip["first_id"] = row["audiocap_id"]
            clip["references"].append(row["caption"])
    return dict(clips)

"""Synthetic, offline stand-in for the Hugging Face dataset ``OpenSound/AudioCaps``.

The real data pipeline (parquet shards -> decode -> resample -> log-mel ->
captions) has to be testable without network access or the 50k-clip corpus.
`make_synthetic_audiocaps` writes a small dataset with *exactly* the on-disk layout of
``OpenSound/AudioCaps``::

    OUT/data/train-00000-of-00002.parquet
    OUT/data/validation-00000-of-00002.parquet
    OUT/data/test-00000-of-00002.parquet
    ...

with the columns (in this order) ``audio`` (``struct<bytes: binary, path:
string>`` holding a whole encoded audio file), ``caption`` (string),
``audiocap_id`` (int64, unique per row), ``youtube_id`` (string, 11 chars) and
``start_time`` (int64 seconds).  Train has one caption per clip; validation and
test have five rows (five distinct reference captions) per clip, sharing the
audio bytes, ``youtube_id`` and ``start_time`` -- just like AudioCaps.

The audio is procedurally generated sound events (tones, chirps, coloured
noise, beeps, buzzing, clicks, and "X followed by Y" sequences) that are
acoustically very distinct, so that a *tiny* model trained on log-mel features
can actually learn to caption them; this makes end-to-end smoke tests of the
training loop meaningful (loss must go down, captions must match).

Clips deliberately cycle through every container/codec (WAV, FLAC, MP3,
OGG/Vorbis), sample rate (16, 22.05, 44.1, 48 kHz), mono/stereo, 1-10 s
durations and a few clips longer than 30 s, so the loader's decode/resample/
downmix/crop paths all get exercised.

Everything is deterministic from the seed: two runs with the same arguments
give byte-identical parquet files (see af3dist.embedded.encoding for the one
encoder that needed help).
"""


from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from af3dist.embedded.plan import SPLITS, ClipSpec, plan_clips
from af3dist.storage import building_file

ROW_GROUP_SIZE = 32  # rows per parquet row group; several per shard so readers can stream.

AUDIOCAPS_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("audio", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("caption", pa.string()),
        pa.field("audiocap_id", pa.int64()),
        pa.field("youtube_id", pa.string()),
        pa.field("start_time", pa.int64()),
    ],
    # Same feature metadata `datasets` writes, so `datasets.load_dataset("parquet", ...)`
    # decodes the `audio` column as an Audio feature, like the real hub dataset.
    metadata={
        b"huggingface": json.dumps(
            {
                "info": {
                    "features": {
                        "audio": {"_type": "Audio"},
                        "caption": {"dtype": "string", "_type": "Value"},
                        "audiocap_id": {"dtype": "int64", "_type": "Value"},
                        "youtube_id": {"dtype": "string", "_type": "Value"},
                        "start_time": {"dtype": "int64", "_type": "Value"},
                    }
                }
            }
        ).encode()
    },
)
"""Arrow schema of every shard (column order matters: it matches the hub dataset)."""



def shard_file_name(split: str, shard: int, num_shards: int) -> str:
    """Hub-style shard name, e.g. ``train-00000-of-00002.parquet``."""
    return f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"


_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-\d{5}-of-\d{5}\.parquet$")


def _clip_table(specs: Sequence[ClipSpec], audio: Sequence[bytes] | None = None) -> pa.Table:
    """Rows of ``specs`` (one per caption) as a table with :data:`AUDIOCAPS_SCHEMA`; ``audio`` holds the
    clips' encoded files when the caller has them (else each spec is encoded)."""
    cols: dict[str, list] = {"audio": [], "caption": [], "audiocap_id": [], "youtube_id": [], "start_time": []}
    for k, spec in enumerate(specs):
        payload = {"bytes": spec.encode() if audio is None else audio[k], "path": spec.path}
        for caption, cap_id in zip(spec.captions, spec.audiocap_ids):
            cols["audio"].append(payload)
            cols["caption"].append(caption)
            cols["audiocap_id"].append(cap_id)
            cols["youtube_id"].append(spec.youtube_id)
            cols["start_time"].append(spec.start_time)
    return pa.Table.from_pydict(cols, schema=AUDIOCAPS_SCHEMA)


def write_split(data_dir: str | os.PathLike[str], split: str, specs: Sequence[ClipSpec], shards: int, *,
                audio: Sequence[bytes] | None = None) -> tuple[list[str], int]:
    """Write ``specs`` as up to ``shards`` hub-named parquet files of ``split`` (any lowercase name) under
    ``data_dir``, a clip's rows never straddling two, each file whole or not at all; stale shards of the split
    from an earlier run with another shard count are removed. ``audio``: the clips' encoded bytes, when the
    caller has them. Returns (paths, rows)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, min(shards, len(specs)))
    bounds = np.linspace(0, len(specs), n_shards + 1).round().astype(int)
    files, rows = [], 0
    for k in range(n_shards):
        lo, hi = bounds[k], bounds[k + 1]
        table = _clip_table(specs[lo:hi], None if audio is None else audio[lo:hi])
        path = data_dir / shard_file_name(split, k, n_shards)
        with building_file(path) as tmp:
            # no dictionary: audio bytes repeated across rows stay as a reader of real shards meets them
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="snappy", use_dictionary=False)
        rows += table.num_rows
        files.append(str(path))
    keep = {Path(f).name for f in files}
    for old in sorted(data_dir.iterdir()):
        m = _SHARD_RE.match(old.name)
        if m and m.group("split") == split and old.name not in keep:
            old.unlink()
    return files, rows


def _resolve_long_clips(long_clips: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(long_clips, Mapping):
        unknown = set(long_clips) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown splits in long_clips: {sorted(unknown)}")
        return {s: int(long_clips.get(s, 1)) for s in SPLITS}
    return {s: int(long_clips) for s in SPLITS}


def make_synthetic_audiocaps(
    out_dir: str | os.PathLike[str],
    *,
    train_clips: int = 256,
    validation_clips: int = 24,
    test_clips: int = 24,
    shards: int = 2,
    long_clips: int | Mapping[str, int] = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a synthetic AudioCaps (OpenSound/AudioCaps layout) under ``out_dir/data``.

    ``shards`` is the number of parquet files per split (fewer when a split has
    fewer clips; a split with 0 clips gets one empty shard).  A clip's rows never
    straddle shards.  ``long_clips`` (an int for every split, or a per-split
    mapping) is the number of >30 s clips per split.  Stale shards of an earlier
    run with a different shard count are removed.  Fully deterministic from the
    arguments.

    Returns a summary: ``{"out_dir", "data_dir", "seed", "files": [paths],
    "splits": {split: {"clips", "rows", "files", "formats", "sample_rates",
    "channels", "long_clips", "sequence_clips", "audio_seconds"}}, "formats",
    "sample_rates", "channels"}`` (counts are per clip).
    """
    if shards < 1:
        raise ValueError("shards must be >= 1")
    counts = {"train": train_clips, "validation": validation_clips, "test": test_clips}
    longs = _resolve_long_clips(long_clips)
    plans = {s: plan_clips(s, counts[s], seed, long_clips=longs[s]) for s in SPLITS}

    seen: set[str] = set()
    for specs in plans.values():
        for spec in specs:
            if spec.youtube_id in seen:  # 66-bit hashes: never expected to happen
                raise RuntimeError(f"youtube_id collision: {spec.youtube_id}")
            seen.add(spec.youtube_id)

    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "out_dir": str(Path(out_dir)),
        "data_dir": str(data_dir),
        "seed": seed,
        "files": [],
        "splits": {},
    }
    totals: dict[str, Counter] = {"formats": Counter(), "sample_rates": Counter(), "channels": Counter()}
    for split in SPLITS:
        specs = plans[split]
        files, rows = write_split(data_dir, split, specs, shards)
        per = {
            "formats": Counter(s.fmt for s in specs),
            "sample_rates": Counter(s.sample_rate for s in specs),
            "channels": Counter(s.channels for s in specs),
        }
        for key, counter in per.items():
            totals[key].update(counter)
        summary["splits"][split] = {
            "clips": len(specs),
            "rows": rows,
            "files": files,
            **{key: dict(sorted(c.items())) for key, c in per.items()},
            "long_clips": sum(s.duration_s > 30.0 for s in specs),
            "sequence_clips": sum(len(s.events) == 2 for s in specs),
            "audio_seconds": round(sum(s.duration_s for s in specs), 3),
        }
        summary["files"].extend(files)
    for key, counter in totals.items():
        summary[key] = dict(sorted(counter.items()))
    return summary

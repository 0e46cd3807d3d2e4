"""The Ray Data pipeline: AudioCaps parquet -> decoded 16 kHz audio -> AF3 model inputs, streaming.

Stages, all in one CPU task per run of consecutive parquet row groups (`task_units`: at least
`data.rows_per_task` rows, across shards), spread over the cluster's CPUs:
  read_row_groups (shards shuffled from a seed) -> decode_rows (decode, downmix, resample, validate)
  -> featurize_rows (log-mel windows, chat template, `<sound>` expansion, labels).
Rows that cannot become training examples are dropped and reported to an ErrorLedger.
The log-mel windows travel compactly (`sound_features` + `sound_pad`, see af3dist.data.batching): the
collate rebuilds them bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Dataset

from af3dist.config import DataConfig
from af3dist.data.audio import TARGET_SAMPLING_RATE, ClipError, load_waveform
from af3dist.data.batching import compact_windows
from af3dist.data.errors import Reports
from af3dist.data.features import Featurizer
from af3dist.data.source import AUDIOCAPS_COLUMNS, SplitFiles, clip_key, split_files

# Columns a training or evaluation consumer gets from `build_dataset`. The log-mel windows are
# `sound_features` (their frames up to the last that is not the window's constant padding value) and
# `sound_pad` (that value, per window): `collate`/`collate_prompts`/`window_features` (af3dist.data.batching)
# rebuild `input_features` exactly. A 10 s clip's row carries a third of its 1.5 MB window.
EXAMPLE_COLUMNS = ["id", "clip_id", "caption", "duration_s", "num_tokens", "num_windows",
                   "input_ids", "labels", "sound_features", "sound_pad", "input_features_mask"]
RAGGED_COLUMNS = ("input_ids", "labels", "sound_features", "sound_pad", "input_features_mask")
# A read unit: consecutive row groups of one parquet shard (`task_units` makes them, `read_row_groups` reads them).
UNITS_SCHEMA = pa.schema([("path", pa.string()), ("row_groups", pa.list_(pa.int64()))])


def ragged(items: list[np.ndarray]) -> np.ndarray:
    """An object array of per-row arrays, which Ray Data stores as a variable-shaped tensor column."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _error(row_id: Any, split: str, reason: str, detail: str) -> dict:
    return {"id": str(row_id), "split": split, "reason": reason, "detail": detail}


def decode_rows(batch: dict[str, np.ndarray], *, split: str, max_seconds: float, quality: str,
                keep_ids: frozenset | None = None, reports: Reports | None = None) -> dict[str, np.ndarray]:
    """Encoded audio -> validated 16 kHz mono waveforms; bad rows are dropped and reported."""
    out: dict[str, list] = {"id": [], "clip_id": [], "caption": [], "duration_s": [], "waveform": []}
    errors = []
    n_seen = 0
    for audio, caption, audiocap_id, youtube_id, start_time in zip(
        batch["audio"], batch["caption"], batch["audiocap_id"], batch["youtube_id"], batch["start_time"]
    ):
        if keep_ids is not None and int(audiocap_id) not in keep_ids:
            continue  # an evaluation split keeps one row per clip
        n_seen += 1
        try:
            if caption is None or not str(caption).strip():
                raise ClipError("empty_caption", "the caption is empty")
            data = audio.get("bytes") if isinstance(audio, dict) else None
            waveform = load_waveform(data, max_seconds=max_seconds, quality=quality)
        except ClipError as e:
            errors.append(_error(audiocap_id, split, e.reason, e.detail))
            continue
        out["id"].append(str(audiocap_id))
        out["clip_id"].append(clip_key(youtube_id, start_time))
        out["caption"].append(str(caption).strip())
        out["duration_s"].append(len(waveform) / TARGET_SAMPLING_RATE)
        out["waveform"].append(waveform)
    if reports is not None:
        reports.report(n_seen, errors)
    return {
        "id": np.array(out["id"], dtype=object),
        "clip_id": np.array(out["clip_id"], dtype=object),
        "caption": np.array(out["caption"], dtype=object),
        "duration_s": np.array(out["duration_s"], dtype=np.float32),
        "waveform": ragged(out["waveform"]),
    }


def featurize_rows(batch: dict[str, np.ndarray], *, processor: str, prompt: str, split: str,
                   reports: Reports | None = None) -> dict[str, np.ndarray]:
    """Waveforms + captions -> input_ids, labels, compact log-mel windows and masks, one row per clip."""
    featurizer = Featurizer.from_pretrained(processor, prompt)
    cols: dict[str, list] = {c: [] for c in EXAMPLE_COLUMNS}
    errors = []
    for i in range(len(batch["id"])):
        try:
            ex = featurizer.training_example(batch["waveform"][i], batch["caption"][i])
        except ClipError as e:
            errors.append(_error(batch["id"][i], split, e.reason, e.detail))
            continue
        for c in ("id", "clip_id", "caption", "duration_s"):
            cols[c].append(batch[c][i])
        cols["num_tokens"].append(len(ex["input_ids"]))
        cols["num_windows"].append(ex["input_features"].shape[0])
        sound, pad = compact_windows(ex["input_features"])
        cols["sound_features"].append(sound)
        cols["sound_pad"].append(pad)
        for c in ("input_ids", "labels", "input_features_mask"):
            cols[c].append(ex[c])
    if errors and reports is not None:  # these rows were already counted as seen by decode_rows
        reports.report(0, errors)
    return {
        "id": np.array(cols["id"], dtype=object),
        "clip_id": np.array(cols["clip_id"], dtype=object),
        "caption": np.array(cols["caption"], dtype=object),
        "duration_s": np.array(cols["duration_s"], dtype=np.float32),
        "num_tokens": np.array(cols["num_tokens"], dtype=np.int32),
        "num_windows": np.array(cols["num_windows"], dtype=np.int32),
        **{c: ragged(cols[c]) for c in RAGGED_COLUMNS},
    }


def row_groups(files: SplitFiles) -> list[tuple[str, int, int]]:
    """(path, row group, rows) of every row group of the split's shards, from the parquet footers only."""
    units = []
    for path in files.paths:
        with files.filesystem.open(path, "rb") as f:
            try:
                meta = pq.ParquetFile(f).metadata
            except (pa.ArrowInvalid, OSError) as e:  # truncated, not parquet, a footer that lies about its size
                raise ValueError(f"shard {path} of split {files.split!r} is not a readable parquet file: {e}") from e
            units += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    return units


def read_row_groups(batch: dict[str, np.ndarray], *, filesystem,
                    columns: list[str] = AUDIOCAPS_COLUMNS) -> Iterator[pa.Table]:
    """Read units ({"path", "row_groups"}) -> the `columns` of each of their row groups, one table at a time."""
    for path, groups in zip(batch["path"], batch["row_groups"]):
        with filesystem.open(str(path), "rb") as f:
            parquet = pq.ParquetFile(f)
            for group in groups:
                yield parquet.read_row_group(int(group), columns=columns)


def row_group_rows(batch: dict[str, np.ndarray], *, filesystem, rows_per_batch: int,
                   columns: list[str] = AUDIOCAPS_COLUMNS) -> Iterator[dict[str, list]]:
    """Read units -> their rows as columns of Python values, `rows_per_batch` rows at a time."""
    for table in read_row_groups(batch, filesystem=filesystem, columns=columns):
        for chunk in table.to_batches(max_chunksize=rows_per_batch):
            yield chunk.to_pydict()


def task_units(plan: list[dict], rows_per_task: int) -> list[list[dict]]:
    """The plan's row groups ({"path", "row_group", "rows"}) cut into tasks: runs of consecutive entries, across
    shards, of at least `rows_per_task` rows, each a list of read units ({"path", "row_groups", "rows"}: one
    shard's consecutive row groups). Every task costs Ray a scheduling round trip (tens of ms on a busy node),
    so small row groups and small shards make fewer, longer tasks; the order of the rows is the plan's."""
    tasks: list[list[dict]] = []
    rows = rows_per_task  # rows in the last task: a full one opens the next
    for entry in plan:
        if rows >= rows_per_task:
            tasks.append([])
            rows = 0
        units = tasks[-1]
        if units and units[-1]["path"] == entry["path"]:
            units[-1]["row_groups"].append(entry["row_group"])
            units[-1]["rows"] += entry["rows"]
        else:
            units.append({"path": entry["path"], "row_groups": [entry["row_group"]], "rows": entry["rows"]})
        rows += entry["rows"]
    return tasks


def examples_from_row_groups(batch: dict[str, np.ndarray], *, filesystem, rows_per_batch: int,
                             decode: dict[str, Any], featurize: dict[str, Any],
                             ledger=None) -> Iterator[dict[str, np.ndarray]]:
    """Read units -> model-ready examples, `rows_per_batch` rows at a time, in one task. The task's error
    reports go to the ledger without a round trip per batch, all landed before the task ends (a pass ends
    only when its tasks have)."""
    reports = Reports(ledger)
    for rows in row_group_rows(batch, filesystem=filesystem, rows_per_batch=rows_per_batch):
        yield featurize_rows(decode_rows(rows, **decode, reports=reports), **featurize, reports=reports)
    reports.flush()


def plan_row_groups(cfg: DataConfig, split: str, epoch: int = 0, epochs: int = 1) -> tuple[SplitFiles, list[dict]]:
    """The split's files and its row groups ({"path", "row_group", "rows"}) in read order for `epochs` passes
    from pass `epoch`.

    Shard order is shuffled per pass from (seed, pass) when configured; row groups keep their file order.
    """
    files = split_files(cfg.source, split)
    units = row_groups(files)
    plan = []
    for e in range(epoch, epoch + epochs):
        order = list(files.paths)
        if cfg.shuffle:
            random.Random(cfg.seed * 1_000_003 + e).shuffle(order)
        rank = {path: i for i, path in enumerate(order)}
        plan += [{"path": path, "row_group": group, "rows": rows}
                 for path, group, rows in sorted(units, key=lambda unit: (rank[unit[0]], unit[1]))]
    return files, plan


def units_dataset(tasks: list[list[dict]], preserve_order: bool = True) -> Dataset:
    """Tasks (lists of read units, {"path", "row_groups"} dicts) as a dataset of one block per task, so that
    each map task (`map_batches(batch_size=None)`) reads one task's units; with `preserve_order` (training: a
    seed always gives the same row order) results come out in plan order."""
    blocks = [pa.Table.from_pylist(units, schema=UNITS_SCHEMA) for units in tasks]  # the schema drops "rows"
    ds = ray.data.from_arrow(blocks or [UNITS_SCHEMA.empty_table()])
    ds.context.execution_options.preserve_order = preserve_order
    return ds


def read_split(cfg: DataConfig, split: str, epoch: int = 0, epochs: int = 1) -> Dataset:
    """The split's raw AudioCaps rows, streamed, for `epochs` passes starting at pass `epoch`."""
    files, plan = plan_row_groups(cfg, split, epoch, epochs)
    return units_dataset(task_units(plan, cfg.rows_per_task)).map_batches(
        read_row_groups, fn_kwargs=dict(filesystem=files.filesystem), batch_size=None, batch_format="numpy",
        num_cpus=cfg.cpus_per_data_task, concurrency=cfg.max_data_tasks)


def build_dataset(cfg: DataConfig, processor: str, split: str, *, ledger=None,
                  keep_ids: frozenset | None = None, epoch: int = 0, epochs: int = 1,
                  part: tuple[int, int] = (0, 1)) -> Dataset:
    """Model-ready examples of one split, for `epochs` passes from pass `epoch` in one stream (a trainer
    is spared the start-up of a new execution every epoch). `processor` is the model folder or hub id
    whose processor to use; `keep_ids` (audiocap_ids) restricts the rows, e.g. to one row per clip for
    evaluation.

    The driver plans the shards' row groups from the parquet footers; `part` = (i, n) keeps every n-th from
    the i-th (one trainer rank's own share, in plan order), and `task_units` joins them into tasks of at least
    `rows_per_task` rows. One task reads, decodes and featurizes its row groups: the encoded audio never
    travels through the object store, and its examples flow a block (`block_mb`) at a time as it goes.
    """
    files, plan = plan_row_groups(cfg, split, epoch, epochs)
    tasks = task_units(plan[part[0]::part[1]], cfg.rows_per_task)
    decode = dict(split=split, max_seconds=cfg.max_audio_seconds, quality=cfg.resample_quality,
                  keep_ids=keep_ids)
    featurize = dict(processor=processor, prompt=cfg.prompt, split=split)
    ds = units_dataset(tasks).map_batches(
        examples_from_row_groups, batch_size=None, batch_format="numpy", num_cpus=cfg.cpus_per_data_task,
        concurrency=cfg.max_data_tasks,
        fn_kwargs=dict(filesystem=files.filesystem, rows_per_batch=cfg.decode_batch_size, decode=decode,
                       featurize=featurize, ledger=ledger))
    if cfg.block_mb is not None:  # this dataset's own context: other datasets keep theirs
        ds.context.target_max_block_size = int(cfg.block_mb * 2**20)
    return ds

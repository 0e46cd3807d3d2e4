"""The Ray Data pipeline: AudioCaps parquet -> decoded 16 kHz audio -> AF3 model inputs, streaming.

Stages (CPU `map_batches` tasks, fused by Ray Data, spread over the cluster's CPUs):
  read_parquet (files shuffled from a seed) -> decode_rows (decode, downmix, resample, validate)
  -> featurize_rows (log-mel windows, chat template, `<sound>` expansion, labels).
Rows that cannot become training examples are dropped and reported to an ErrorLedger.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import ray
from ray.data import Dataset

from af3dist.config import DataConfig
from af3dist.data.audio import TARGET_SAMPLING_RATE, ClipError, load_waveform
from af3dist.data.errors import report_errors
from af3dist.data.features import Featurizer
from af3dist.data.source import AUDIOCAPS_COLUMNS, clip_key, split_files

# Columns a training or evaluation consumer gets from `build_dataset`.
EXAMPLE_COLUMNS = ["id", "clip_id", "caption", "duration_s", "num_tokens", "num_windows",
                   "input_ids", "labels", "input_features", "input_features_mask"]


def ragged(items: list[np.ndarray]) -> np.ndarray:
    """An object array of per-row arrays, which Ray Data stores as a variable-shaped tensor column."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _error(row_id: Any, split: str, reason: str, detail: str) -> dict:
    return {"id": str(row_id), "split": split, "reason": reason, "detail": detail}


def decode_rows(batch: dict[str, np.ndarray], *, split: str, max_seconds: float, quality: str,
                keep_ids: frozenset | None = None, ledger=None) -> dict[str, np.ndarray]:
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
    report_errors(ledger, n_seen, errors)
    return {
        "id": np.array(out["id"], dtype=object),
        "clip_id": np.array(out["clip_id"], dtype=object),
        "caption": np.array(out["caption"], dtype=object),
        "duration_s": np.array(out["duration_s"], dtype=np.float32),
        "waveform": ragged(out["waveform"]),
    }


def featurize_rows(batch: dict[str, np.ndarray], *, processor: str, prompt: str, split: str,
                   ledger=None) -> dict[str, np.ndarray]:
    """Waveforms + captions -> input_ids, labels, log-mel windows and masks, one row per clip."""
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
        for c in ("input_ids", "labels", "input_features", "input_features_mask"):
            cols[c].append(ex[c])
    if errors:  # these rows were already counted as seen by decode_rows
        report_errors(ledger, 0, errors)
    return {
        "id": np.array(cols["id"], dtype=object),
        "clip_id": np.array(cols["clip_id"], dtype=object),
        "caption": np.array(cols["caption"], dtype=object),
        "duration_s": np.array(cols["duration_s"], dtype=np.float32),
        "num_tokens": np.array(cols["num_tokens"], dtype=np.int32),
        "num_windows": np.array(cols["num_windows"], dtype=np.int32),
        **{c: ragged(cols[c]) for c in ("input_ids", "labels", "input_features", "input_features_mask")},
    }


def read_split(cfg: DataConfig, split: str, epoch: int = 0, epochs: int = 1) -> Dataset:
    """The split's raw AudioCaps rows, streamed, for `epochs` passes starting at pass `epoch`.

    Shard order is shuffled per pass from (seed, pass) when configured, and output order is preserved,
    so a seed always gives the same row order. Several passes in one stream spare a trainer the
    start-up of a new execution every epoch.
    """
    files = split_files(cfg.source, split)
    passes = []
    for e in range(epoch, epoch + epochs):
        order = list(files.paths)
        if cfg.shuffle:
            random.Random(cfg.seed * 1_000_003 + e).shuffle(order)
        # One read per pass: a single read_parquet given the same file twice reads it once.
        passes.append(ray.data.read_parquet(order, filesystem=files.arrow_filesystem())
                      .select_columns(AUDIOCAPS_COLUMNS))
    ds = passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]
    ds.context.execution_options.preserve_order = True
    return ds


def build_dataset(cfg: DataConfig, processor: str, split: str, *, ledger=None,
                  keep_ids: frozenset | None = None, epoch: int = 0, epochs: int = 1) -> Dataset:
    """Model-ready examples of one split. `processor` is the model folder or hub id whose processor to use.

    `keep_ids` (audiocap_ids) restricts the rows, e.g. to one row per clip for evaluation.
    """
    stage_args: dict[str, Any] = dict(
        batch_size=cfg.decode_batch_size, batch_format="numpy", num_cpus=cfg.cpus_per_data_task,
        concurrency=cfg.max_data_tasks,
    )
    # Shards are read whole (one block per row group, often hundreds of clips); cut them into small
    # blocks as they stream so decoding spreads over every CPU instead of one task per shard.
    ds = read_split(cfg, split, epoch, epochs).repartition(target_num_rows_per_block=cfg.decode_batch_size)
    ds = ds.map_batches(decode_rows, fn_kwargs=dict(split=split, max_seconds=cfg.max_audio_seconds,
                                                    quality=cfg.resample_quality, keep_ids=keep_ids,
                                                    ledger=ledger), **stage_args)
    return ds.map_batches(featurize_rows, fn_kwargs=dict(processor=processor, prompt=cfg.prompt, split=split,
                                                         ledger=ledger), **stage_args)

"""Run the data plane on its own: stream a split through the pipeline into training batches and report.

This is what a training worker's input looks like, without the model: useful to check a dataset,
measure throughput and see what was dropped before spending GPU time.
"""

from __future__ import annotations

import json
import logging
import time

import ray

from af3dist import storage
from af3dist.cluster import init_ray
from af3dist.config import Config
from af3dist.data.batching import collate, iter_bucketed
from af3dist.data.errors import DataQualityError, ErrorLedger
from af3dist.data.features import IGNORE_INDEX, load_processor
from af3dist.data.pipeline import build_dataset
from af3dist.embedded.assets import prepare_embedded

log = logging.getLogger(__name__)


def run_data_pipeline(cfg: Config, split: str | None = None, batch_size: int = 8,
                      limit: int | None = None) -> dict:
    """Stream `split` through decode -> featurize -> bucketing -> collate; return a summary dict.

    Dropped rows go to `<output_dir>/data_errors.jsonl`; past the error-rate ceiling this raises
    DataQualityError after writing that file.
    """
    split = split or cfg.data.train_split
    prepare_embedded(cfg)
    init_ray(cfg.ray)
    ledger = ErrorLedger.remote(cfg.data.error_rate_ceiling, cfg.data.min_rows_before_ceiling)
    processor = load_processor(cfg.model.name_or_path)
    ds = build_dataset(cfg.data, cfg.model.name_or_path, split, ledger=ledger)
    if limit:
        ds = ds.limit(limit)

    clips = tokens = real_tokens = label_tokens = windows = batches = 0
    first_batch = None
    start = time.perf_counter()
    failure = None
    try:
        for rows in iter_bucketed(ds, batch_size, cfg.data.bucket_pool_batches, cfg.data.seed):
            batch = collate(rows, processor.tokenizer.pad_token_id)
            first_batch = first_batch or batch
            batches += 1
            clips += len(rows)
            tokens += batch["input_ids"].numel()
            real_tokens += int(batch["attention_mask"].sum())
            label_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            windows += batch["input_features"].shape[0]
            if batches % 10 == 0:
                elapsed = time.perf_counter() - start
                print(f"[data] {clips} clips, {clips / elapsed:.1f} clips/s", flush=True)
    except Exception as e:  # a ceiling breach surfaces wrapped by Ray Data; keep the errors file anyway
        failure = e
    elapsed = time.perf_counter() - start

    errors_path = storage.join(cfg.output_dir, "data_errors.jsonl")
    ray.get(ledger.write.remote(errors_path))
    counts = ray.get(ledger.get_summary.remote())
    message = ray.get(ledger.final_check.remote())
    if failure is not None:
        if message:
            raise DataQualityError(message) from failure
        raise failure
    if message:
        raise DataQualityError(message)

    summary = {
        "split": split,
        "source": cfg.data.source,
        "clips": clips,
        "batches": batches,
        "clips_per_s": round(clips / elapsed, 2) if elapsed else None,
        "audio_windows": windows,
        "padding_fraction": round(1 - real_tokens / tokens, 4) if tokens else None,
        "label_tokens": label_tokens,
        **counts,
        "errors_file": errors_path,
    }
    if first_batch is not None:
        ids, labels = first_batch["input_ids"][0], first_batch["labels"][0]
        summary["example_target"] = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
        summary["example_batch_shapes"] = {k: list(v.shape) for k, v in first_batch.items()}
    return summary


def print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=2))

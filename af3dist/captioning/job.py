"""Offline batch captioning with Ray Data: millions of clips in, one output row per clip out.

  plan (driver: ids and locations only, minus ids already in the output)
  -> read bytes (CPU tasks; files through fsspec, or parquet rows)
  -> decode, downmix, resample, featurize (CPU tasks; the data plane's `load_waveform` and `Featurizer`)
  -> caption (an actor pool of models, greedy, length-bucketed batches; GPUs per actor where there are GPUs)
  -> shards written atomically by the driver as results stream in, with progress and a final summary.

Every stage streams (Ray Data backpressure bounds memory), and a bad input never stops the run: it travels
down the pipeline as a row with `error` set ("<reason>: <detail>", reason from `af3dist.data.audio.REASONS`)
and no model work. A rerun with the same output skips ids already written, so every input ends up in the
output exactly once; with `retry_errors` it also recaptions the ids whose error is transient
(`TRANSIENT_REASONS`: unreadable, timeout, generation_failed), and the new attempt replaces the old row
(`shards.read_output` keeps the latest attempt per id, `shards.compact_output` rewrites the files).
One run per output folder at a time: the run holds the folder's lock (`af3dist.captioning.lock`) from
before it touches the folder until it ends, normally or not.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from af3dist.captioning.inputs import InputPlan, check_output_outside_input, plan_inputs
from af3dist.captioning.lock import OutputLock
from af3dist.captioning.shards import (
    SUMMARY_FILE, ShardWriter, compact_output, read_done_ids, read_output, remove_temp_files, write_atomic,
)
from af3dist.cluster import init_ray
from af3dist.config import CaptionBatchConfig, RayConfig
from af3dist.data.audio import (
    TARGET_SAMPLING_RATE, TRANSIENT_REASONS, ClipError, load_waveform, read_audio_file,
)
from af3dist.data.batching import length_key, rows_of
from af3dist.data.features import Featurizer, load_processor
from af3dist.data.pipeline import ragged, row_group_rows, units_dataset
from af3dist.inference import CaptionPredictor
from af3dist.model.loading import resolve_model

log = logging.getLogger(__name__)

# What the model stage needs per row (CaptionPredictor's input), besides the id.
MODEL_COLUMNS = ["input_ids", "input_features", "input_features_mask", "num_windows", "num_tokens"]
MAX_INPUT_BLOCKS = 4096


# --------------------------------------------------------------------------------------------------------
# CPU stages


def _out(ids: list, paths: list, data: list, errors: list) -> dict[str, np.ndarray]:
    # no-error is "" and no-bytes is b"" inside the pipeline: a column of only None would become floats
    return {"id": np.array(ids, dtype=object), "path": np.array(paths, dtype=object),
            "bytes": np.array(data, dtype=object), "error": np.array(errors, dtype=object)}


def read_file_rows(batch: dict[str, np.ndarray], *, max_bytes: int) -> dict[str, np.ndarray]:
    """(id, path, location) -> (id, path, bytes, error): each file's bytes, or why it cannot be read."""
    data, errors = [], []
    for location in batch["location"]:
        try:  # read_audio_file refuses local FIFOs, devices and sockets without opening them
            data.append(read_audio_file(str(location), max_bytes))
            errors.append("")
        except ClipError as e:
            data.append(b"")
            errors.append(str(e))
    return _out(list(batch["id"]), list(batch["path"]), data, errors)


def read_parquet_rows(batch: dict[str, Any], *, key_column: str, keep: frozenset) -> dict[str, np.ndarray]:
    """Parquet rows -> (id, path, bytes, error) for the rows to caption (one per id, not yet done)."""
    from af3dist.data.source import clip_key

    ids, paths, data, errors = [], [], [], []
    for i, key in enumerate(batch[key_column]):
        if key not in keep:
            continue
        if key_column == "audiocap_id":
            ids.append(clip_key(batch["youtube_id"][i], batch["start_time"][i]))
        else:
            ids.append(str(key))
        audio = batch["audio"][i]
        audio = audio if isinstance(audio, dict) else {}
        paths.append(str(audio.get("path") or ""))
        data.append(audio.get("bytes") or b"")  # no bytes -> missing_audio when decoded
        errors.append("")
    return _out(ids, paths, data, errors)


def featurize_clip_rows(batch: dict[str, np.ndarray], *, processor: str, prompt: str,
                        max_seconds: float) -> dict[str, np.ndarray]:
    """(id, path, bytes, error) -> model inputs per clip, or the row's error with empty inputs."""
    import torch

    torch.set_num_threads(1)  # one task per (fraction of a) CPU; Ray schedules the parallelism
    featurizer = Featurizer.from_pretrained(processor, prompt)
    fe = featurizer.processor.feature_extractor
    empty = {"input_ids": np.zeros(0, np.int32), "input_features": np.zeros((0, fe.feature_size, fe.nb_max_frames),
                                                                            np.float32),
             "input_features_mask": np.zeros((0, fe.nb_max_frames), bool)}
    cols: dict[str, list] = {c: [] for c in ["id", "path", "duration_s", "error", *MODEL_COLUMNS]}
    for i in range(len(batch["id"])):
        error, ex, duration = batch["error"][i], empty, None
        if not error:
            try:
                waveform = load_waveform(batch["bytes"][i], max_seconds=max_seconds)
                duration = len(waveform) / TARGET_SAMPLING_RATE
                ex = featurizer.generation_inputs(waveform)
            except ClipError as e:
                error = str(e)
            except Exception as e:  # a decoder bug must not end the run: the clip gets the error instead
                error = f"corrupt: {type(e).__name__}: {e}"
        cols["id"].append(batch["id"][i])
        cols["path"].append(batch["path"][i])
        cols["duration_s"].append(np.nan if duration is None else duration)
        cols["error"].append(error or "")
        for c in ("input_ids", "input_features", "input_features_mask"):
            cols[c].append(ex[c])
        cols["num_windows"].append(ex["input_features"].shape[0])
        cols["num_tokens"].append(len(ex["input_ids"]))
    return {
        "id": np.array(cols["id"], dtype=object), "path": np.array(cols["path"], dtype=object),
        "duration_s": np.array(cols["duration_s"], dtype=np.float32), "error": np.array(cols["error"], dtype=object),
        "num_windows": np.array(cols["num_windows"], dtype=np.int32),
        "num_tokens": np.array(cols["num_tokens"], dtype=np.int32),
        **{c: ragged(cols[c]) for c in ("input_ids", "input_features", "input_features_mask")},
    }


def clip_rows_from_row_groups(batch: dict[str, np.ndarray], *, filesystem, columns: list[str],
                              rows_per_batch: int, pick: dict[str, Any],
                              featurize: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Read units ({"path", "row_groups"}) of parquet input -> model inputs of the rows to caption."""
    for rows in row_group_rows(batch, filesystem=filesystem, rows_per_batch=rows_per_batch, columns=columns):
        picked = read_parquet_rows(rows, **pick)
        if len(picked["id"]):
            yield featurize_clip_rows(picked, **featurize)


# --------------------------------------------------------------------------------------------------------
# The model stage


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA OOM, or a CPU allocator's "out of memory"-like RuntimeError: a smaller batch may fit."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CaptionActor:
    """One model per actor. Rows with an error pass through untouched; the others are sorted by length
    and captioned `batch_size` at a time by a `CaptionPredictor` (greedy). A batch that runs out of memory
    is halved and retried, down to one clip; one that fails otherwise is retried clip by clip, so one bad
    clip fails alone. A clip whose generation still fails alone gets `generation_failed`, a transient
    reason (`--retry-errors` retries it), never `corrupt`: the failure says nothing about the file."""

    def __init__(self, model: str, adapter: str | None, dtype: str, max_new_tokens: int, batch_size: int,
                 threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.batch_size = batch_size
        self.predictor = CaptionPredictor(model, adapter=adapter, dtype=dtype, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size)

    def _generate(self, batch: dict[str, np.ndarray], idx: list[int]) -> list[str | ClipError]:
        """Captions of the rows `idx` (at most `batch_size`, one generate call), or per-row errors."""
        sub = {k: batch[k][idx] for k in ["id", *MODEL_COLUMNS]}
        try:
            return list(self.predictor(sub)["prediction"])
        except Exception as e:
            if len(idx) == 1:
                return [ClipError("generation_failed", f"{type(e).__name__} at batch size 1: {e}")]
            if is_out_of_memory(e):
                _free_accelerator_memory()
                half = (len(idx) + 1) // 2
                log.warning("generation ran out of memory at batch size %d; retrying at %d", len(idx), half)
                parts = [idx[:half], idx[half:]]
            else:
                parts = [[i] for i in idx]
            return [p for part in parts for p in self._generate(batch, part)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        captions = [""] * n
        errors = list(batch["error"])
        lengths = rows_of({k: batch[k] for k in ("num_windows", "num_tokens")})
        ok = sorted((i for i in range(n) if not errors[i]), key=lambda i: length_key(lengths[i]))
        for start in range(0, len(ok), self.batch_size):
            idx = ok[start:start + self.batch_size]
            for i, p in zip(idx, self._generate(batch, idx)):
                if isinstance(p, ClipError):
                    errors[i] = str(p)
                else:
                    captions[i] = p
        return {"id": batch["id"], "path": batch["path"], "caption": np.array(captions, dtype=object),
                "duration_s": batch["duration_s"], "error": np.array(errors, dtype=object)}


# --------------------------------------------------------------------------------------------------------
# The run


def _cluster_resources() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


def actor_resources(cfg: CaptionBatchConfig) -> tuple[float, float]:
    """(CPUs, GPUs) per captioning actor. On a CPU-only cluster the actors together leave a share of the
    CPUs to the read/decode stages, which would otherwise never be scheduled."""
    cpus, gpus = _cluster_resources()
    n_gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if cfg.cpus_per_actor is not None:
        return cfg.cpus_per_actor, n_gpus
    if n_gpus > 0:
        return 1.0, n_gpus
    return max(0.1, min(1.0, (cpus - 2 * cfg.cpus_per_task) / cfg.actors[1])), n_gpus


def build_pipeline(cfg: CaptionBatchConfig, plan: InputPlan, todo: list[int], processor: str, model: str,
                   adapter: str | None) -> ray.data.Dataset:
    """The Ray Data pipeline over the plan's inputs at positions `todo`, ending in output columns."""
    task = dict(batch_format="numpy", num_cpus=cfg.cpus_per_task, batch_size=cfg.read_batch_size)
    featurize = dict(processor=processor, prompt=cfg.prompt, max_seconds=cfg.max_seconds)
    if plan.kind == "files":
        table = pa.table({"id": [plan.ids[i] for i in todo], "path": [plan.paths[i] for i in todo],
                          "location": [plan.locations[i] for i in todo]})
        # blocks of read_batch_size rows (at most MAX_INPUT_BLOCKS of them) so reads spread over every CPU;
        # no repartition operator, whose tasks each hold a whole CPU that the model actors may need
        rows_per_block = max(cfg.read_batch_size, -(-len(todo) // MAX_INPUT_BLOCKS))
        ds = ray.data.from_arrow(table, override_num_blocks=max(1, -(-len(todo) // rows_per_block)))
        ds = ds.map_batches(read_file_rows, fn_kwargs=dict(max_bytes=int(cfg.max_file_mb * 2**20)), **task)
        ds = ds.map_batches(featurize_clip_rows, fn_kwargs=featurize, **task)
    else:
        files = plan.parquet
        columns = ["audio", plan.key_column] + (["youtube_id", "start_time"] if plan.key_column == "audiocap_id"
                                                else [])
        # one task per parquet row group reads, picks and featurizes its rows (the training pipeline's reader)
        tasks = [[{"path": path, "row_groups": [group]}] for path, group in plan.row_groups]
        ds = units_dataset(tasks, preserve_order=False).map_batches(
            clip_rows_from_row_groups, batch_size=None, batch_format="numpy", num_cpus=cfg.cpus_per_task,
            fn_kwargs=dict(filesystem=files.filesystem, columns=columns, rows_per_batch=cfg.read_batch_size,
                           pick=dict(key_column=plan.key_column, keep=frozenset(plan.row_keys[i] for i in todo)),
                           featurize=featurize))
    cpus, gpus = actor_resources(cfg)
    lo, hi = cfg.actors
    return ds.map_batches(
        CaptionActor,
        fn_constructor_kwargs=dict(model=model, adapter=adapter, dtype=cfg.dtype, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size, threads=max(1, round(cpus))),
        batch_size=cfg.batch_size * cfg.bucket_batches, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), num_cpus=cpus, num_gpus=gpus,
    )


class Progress:
    """Clips done, clips/s and ETA, printed every `every` seconds and once at the end."""

    def __init__(self, total: int, every: float, printer=print):
        self.total, self.every, self.printer = total, every, printer
        self.done = self.errors = 0
        self.start = self._last = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, clips) of the first results: start-up is over
        self._reported = -1
        self.last = self.start

    def update(self, done: int, errors: int) -> None:
        self.last = time.perf_counter()
        if self.first is None and done:
            self.first = (self.last, done)
        self.done += done
        self.errors += errors
        if self.last - self._last >= self.every:
            self.report()

    def steady_rate(self) -> float | None:
        """Clips/s after the first results arrived (actor start-up and model load excluded)."""
        if self.first is None or self.last <= self.first[0]:
            return None
        return (self.done - self.first[1]) / (self.last - self.first[0])

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def report(self, final: bool = False) -> None:
        if final and self._reported == self.done:
            return
        self._last, self._reported = time.perf_counter(), self.done
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100 * self.done / self.total if self.total else 100.0
        self.printer(f"[caption-batch] {self.done}/{self.total} clips ({pct:.1f}%), {rate:.1f} clips/s, "
                     f"ETA {_duration(eta)}, {self.errors} errors")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _model_label(model: str, adapter: str | None) -> str:
    return f"{model}+{adapter}" if adapter else model


def error_reason(error: str) -> str:
    """The reason of an output row's error ("corrupt: truncated flac ..." -> "corrupt")."""
    return error.split(":", 1)[0]


def is_transient(error: str | None) -> bool:
    """Whether a stored error says nothing about the clip (a rerun with `retry_errors` tries it again)."""
    return bool(error) and error_reason(error) in TRANSIENT_REASONS


def _done_ids(cfg: CaptionBatchConfig, printer) -> tuple[set[str], int]:
    """(ids the output already settles, how many of its error rows this run retries); warns when the
    output holds rows of another model or prompt."""
    existing = read_output(cfg.output, ["id", "model", "prompt", "error"])
    others = {(m, p) for m, p in zip(existing["model"].to_pylist(), existing["prompt"].to_pylist())} - {
        (_model_label(cfg.model, cfg.adapter), cfg.prompt)}
    if others:
        printer(f"[caption-batch] warning: {cfg.output} already holds rows from another model or prompt "
                f"{sorted(others)[:3]}; their ids are skipped, not recaptioned")
    done, retry = set(), 0
    for row_id, error in zip(existing["id"].to_pylist(), existing["error"].to_pylist()):
        if cfg.retry_errors and is_transient(error):
            retry += 1
        else:
            done.add(row_id)
    return done, retry


def _row(cfg: CaptionBatchConfig, batch: dict[str, np.ndarray], i: int) -> dict:
    """Output row `i` of a result batch."""
    error = batch["error"][i] or None
    duration = float(batch["duration_s"][i])
    return {"id": str(batch["id"][i]), "path": batch["path"][i], "caption": None if error else batch["caption"][i],
            "duration_s": None if np.isnan(duration) else duration, "model": _model_label(cfg.model, cfg.adapter),
            "prompt": cfg.prompt, "error": error}


def _caption(cfg: CaptionBatchConfig, plan: InputPlan, todo: list[int], writer: ShardWriter, lock: OutputLock,
             progress: Progress) -> tuple[int, Counter, int, float]:
    """Stream the pipeline over `todo` into shards; (captioned, errors by reason, repeated rows dropped,
    seconds from the pipeline's start to its last shard)."""
    model, adapter, processor = resolve_model(cfg.model, cfg.adapter)
    load_processor(processor)  # fail in the driver, not in every task, when the model folder is wrong
    wanted = {plan.ids[i] for i in todo}
    written: set[str] = set()
    reasons: Counter[str] = Counter()
    captioned = repeated = 0
    ds = build_pipeline(cfg, plan, todo, processor, model, adapter)
    progress.start = progress._last = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        lock.check()  # never write on after another run took the output over
        rows = []
        for i in range(len(batch["id"])):
            row = _row(cfg, batch, i)
            if row["id"] in written or row["id"] not in wanted:  # a repeated id (input or retried task)
                repeated += 1
                continue
            written.add(row["id"])
            rows.append(row)
            if row["error"]:
                reasons[error_reason(row["error"])] += 1
            else:
                captioned += 1
        writer.add(rows)
        progress.update(len(rows), sum(1 for r in rows if r["error"]))
    writer.flush()
    progress.report(final=True)
    return captioned, reasons, repeated, time.perf_counter() - progress.start


def run_batch_caption(cfg: CaptionBatchConfig, printer=print, ray_cfg: RayConfig | None = None) -> dict:
    """Caption every input of `cfg.input` not yet in `cfg.output` on the Ray cluster of `ray_cfg` (default:
    $RAY_ADDRESS, else a local instance); return (and write) the run's summary.

    Refuses at once (ConfigError) when the output is inside the input, and (`lock.OutputLocked`) when
    another live run holds the output's lock. The summary counts the inputs, those skipped as already done,
    the error rows retried, those captioned and those failed by reason in this run, and checks the whole
    output afterwards (`complete`: every input exactly once in the files).
    """
    cfg.require_run_fields()
    check_output_outside_input(cfg.input, cfg.output, cfg.split)
    with OutputLock(cfg.output, stale_after=cfg.lock_stale_seconds) as lock:
        if lock.taken_over:
            printer(f"[caption-batch] took over the stale lock {lock.path} ({lock.taken_over})")
        return _run_locked(cfg, lock, printer, ray_cfg or RayConfig())


def _run_locked(cfg: CaptionBatchConfig, lock: OutputLock, printer, ray_cfg: RayConfig) -> dict:
    t0 = time.perf_counter()
    init_ray(ray_cfg)
    plan = plan_inputs(cfg.input, cfg.split)
    stale = remove_temp_files(cfg.output, lock)
    if stale:
        log.info("removed %d temp files left by an interrupted run", stale)
    healed = compact_output(cfg.output, lock)  # a retry run killed before its compaction left old rows
    done, retried = _done_ids(cfg, printer)
    todo = [i for i, x in enumerate(plan.ids) if x not in done]
    skipped = len(plan) - len(todo)
    if cfg.limit is not None:
        todo = todo[: cfg.limit]
    printer(f"[caption-batch] {len(plan)} inputs in {cfg.input} ({plan.kind}), {skipped} already in "
            f"{cfg.output}, {len(todo)} to caption" + (f" ({retried} stored errors retried)" if retried else ""))

    writer = ShardWriter(cfg.output, cfg.format, cfg.shard_rows, cfg.flush_seconds)
    progress = Progress(len(todo), cfg.progress_seconds, printer)
    captioned, reasons, repeated, pipeline_s = (_caption(cfg, plan, todo, writer, lock, progress) if todo
                                                else (0, Counter(), 0, 0.0))
    superseded = healed + compact_output(cfg.output, lock)

    after = read_done_ids(cfg.output)
    in_output = set(after)
    summary = {
        "input": cfg.input, "output": cfg.output, "model": _model_label(cfg.model, cfg.adapter),
        "inputs": len(plan), "duplicate_ids_in_input": plan.duplicates, "skipped": skipped,
        "retried_errors": retried, "captioned": captioned, "errors": sum(reasons.values()),
        "errors_by_reason": dict(sorted(reasons.items())), "repeated_rows_dropped": repeated,
        "superseded_rows_removed": superseded, "shards_written": len(writer.shards),
        "wall_s": round(time.perf_counter() - t0, 2), "pipeline_s": round(pipeline_s, 2),
        "clips_per_s": round((captioned + sum(reasons.values())) / pipeline_s, 2) if pipeline_s else None,
        "startup_s": round(progress.first[0] - progress.start, 2) if progress.first else None,
        "steady_clips_per_s": None if progress.steady_rate() is None else round(progress.steady_rate(), 2),
        "missing": sum(1 for x in plan.ids if x not in in_output),
        "duplicates_in_output": len(after) - len(in_output),
    }
    summary["complete"] = summary["missing"] == 0 and summary["duplicates_in_output"] == 0
    write_atomic(cfg.output, SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    printer(f"[caption-batch] done: {captioned} captioned, {summary['errors']} errors "
            f"{summary['errors_by_reason']}, {skipped} skipped, {summary['wall_s']} s; "
            f"{'complete' if summary['complete'] else str(summary['missing']) + ' inputs still missing'}")
    return summary

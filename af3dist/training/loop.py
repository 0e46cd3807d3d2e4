"""The per-worker training loop (Ray Train V2 + DeepSpeed + LoRA). Reads top to bottom:
setup -> restore -> train loop (log, evaluate, checkpoint) -> final checkpoint.

Every worker runs this function; Ray Train has already set up torch.distributed (gloo on CPU, NCCL on
GPU), which DeepSpeed joins. Data arrives pre-featurized from Ray Data shards.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import deepspeed
import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from af3dist.config import Config
from af3dist.data.batching import collate, iter_bucketed
from af3dist.data.features import IGNORE_INDEX, load_processor
from af3dist.generation import GenerationEngine
from af3dist.inference import captions
from af3dist.metrics import caption_metrics
from af3dist.model.encoder import SoundOnlyEncoder
from af3dist.model.loading import load_model, resolve_dtype
from af3dist.training.deepspeed_config import lora_engine
from af3dist.training.loss import label_loss_sum
from af3dist.training.memory import choose_gradient_checkpointing, micro_batch_tokens
from af3dist.training.state import (ADAPTER_DIR, DEEPSPEED_DIR, DEEPSPEED_TAG, MetricsLog, SampleLog,
                                    TrainerState, train_shard_name)

log = logging.getLogger(__name__)


def _to(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Worker:
    """One rank's model, engine, data and bookkeeping."""

    def __init__(self, cfg: Config, references: dict[str, list[str]]):
        self.cfg, self.tc = cfg, cfg.train
        self.references = references
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        on_gpu = self.device.type == "cuda"
        precision = self.tc.precision if self.tc.precision != "auto" else ("bf16" if on_gpu else "fp32")
        self.dtype = resolve_dtype(precision, on_gpu)
        torch.manual_seed(self.tc.seed)

        processor = load_processor(cfg.model.name_or_path)
        self.processor = processor
        self.pad_id = processor.tokenizer.pad_token_id
        self.eos_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

        model = load_model(cfg.model.name_or_path, self.dtype)
        # A padding-free encoder reads only the leading frames of the windows: collate only those (the very
        # values it would cut out of whole windows), not 30 s of mostly padding per clip.
        self.audio_frames = "needed" if any(isinstance(m, SoundOnlyEncoder) for m in model.modules()) else "window"
        tokens = micro_batch_tokens(self.tc.micro_batch_size, cfg.data.max_audio_seconds, self.tc.micro_batch_tokens)
        checkpointing, why = choose_gradient_checkpointing(self.tc.gradient_checkpointing, model.config.text_config,
                                                           tokens, self.device)
        if self.rank == 0:
            print(f"[train] gradient checkpointing {'on' if checkpointing else 'off'} ({why})", flush=True)
        self.engine, self.scheduler = lora_engine(model, cfg.lora, self.tc, self.world, self.dtype, checkpointing)
        self.state = TrainerState()

    # ------------------------------------------------------------------ checkpoints
    def restore(self) -> None:
        """Resume from the latest checkpoint, or, when it cannot be read (a partial upload, a corrupt file),
        from the newest one before it that can, with a warning: one bad checkpoint never ends a run."""
        latest = ray.train.get_checkpoint()
        if latest is None:
            return
        for checkpoint in checkpoints_newest_first(latest):
            try:
                with checkpoint.as_directory() as folder:
                    state = TrainerState.load(Path(folder))  # first: cheap, and a partial checkpoint lacks it
                    loaded, _ = self.engine.load_checkpoint(str(Path(folder, DEEPSPEED_DIR)), tag=DEEPSPEED_TAG,
                                                            load_module_strict=False)
                    if loaded is None:
                        raise FileNotFoundError(f"no DeepSpeed state under {DEEPSPEED_DIR}/{DEEPSPEED_TAG}")
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: try the one before
                log.warning("checkpoint %s cannot be restored (%s: %s); trying the one before it",
                            checkpoint.path, type(err).__name__, str(err)[:300])
                if self.rank == 0:
                    print(f"[train] WARNING: checkpoint {checkpoint.path} cannot be restored "
                          f"({type(err).__name__}); falling back to the one before it", flush=True)
                continue
            self.state = state
            if self.rank == 0:
                print(f"[train] resumed from step {self.state.step} (epoch {self.state.epoch}, "
                      f"{self.state.batches_in_epoch} batches into it) from {checkpoint.path}", flush=True)
            return
        raise RuntimeError(f"no checkpoint of this run can be restored (latest: {latest.path}); move its "
                           f"checkpoints aside to start over")

    def save_and_report(self, metrics: dict) -> None:
        """All ranks: DeepSpeed state (own partitions), rank 0: adapter + processor + trainer state."""
        self.state.metrics = metrics
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            self.engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                        exclude_frozen_parameters=True)
            self._save_adapter(folder / ADAPTER_DIR)
            if self.rank == 0:
                self.state.save(folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{self.state.step:06d}")

    def _save_adapter(self, folder: Path) -> None:
        model = self.engine.module
        trainable = [p for p in model.parameters() if p.requires_grad]
        # Under ZeRO-3 each rank holds a slice of every parameter: gather them, or the adapter is empty.
        gather = (deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
                  if self.tc.zero_stage == 3 else nullcontext())
        with gather:
            if self.rank == 0:
                model.save_pretrained(str(folder))
                self.processor.save_pretrained(str(folder))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validation_loss(self) -> float:
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        shard = ray.train.get_dataset_shard("validation")
        for rows in iter_bucketed(shard, self.tc.micro_batch_size, 1, seed=0):
            loss_sum, n = self.loss_sum(_to(collate(rows, self.pad_id, self.audio_frames), self.device, self.dtype))
            total += torch.tensor([float(loss_sum), n], dtype=torch.float64)
        dist.all_reduce(total)
        self.engine.train()
        return float(total[0] / total[1]) if total[1] else float("nan")

    @torch.no_grad()
    def caption_scores(self) -> dict:
        """Greedy captions of this rank's validation clips through the shared generation engine, scored on rank
        0. The engine (and its KV cache) lives for this evaluation only: training gets the memory back."""
        self.engine.eval()
        predictions: dict[str, str] = {}
        generation = GenerationEngine(self.engine.module, self.processor.tokenizer,
                                      max_batch_size=self.tc.micro_batch_size, isolate_failures=False,
                                      synced_gpus=self.tc.zero_stage == 3 and self.world > 1)
        shard = ray.train.get_dataset_shard("val_clips")
        for rows in iter_bucketed(shard, self.tc.micro_batch_size, 1, seed=0):
            for row, text in zip(rows, captions(generation, rows, self.cfg.eval.max_new_tokens)):
                predictions[str(row["clip_id"])] = text
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, predictions)
        self.engine.train()
        if self.rank != 0:
            return {}
        merged = {k: v for part in gathered for k, v in part.items()}
        if not merged:
            return {}
        scores = caption_metrics(merged, {k: self.references[k] for k in merged})
        example = sorted(merged.items())[0]
        print(f"[eval] step {self.state.step}: CIDEr-D {scores['cider_d']:.3f} on {len(merged)} clips; "
              f"e.g. {example[0]}: {example[1]!r}", flush=True)
        return {f"eval_{k}": v for k, v in scores.items() if isinstance(v, (int, float))}

    # ------------------------------------------------------------------ training
    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed next-token loss over the micro batch's label tokens, their count)."""
        if self.tc.loss == "labels_only":
            return label_loss_sum(self.engine, batch)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return self.engine(**batch).loss * n, n

    def micro_batches(self):
        """This rank's micro batches from where the checkpoint left off, epoch after epoch. The rank's stream
        is deterministic (its own read units, in plan order), so skipping the batches a checkpoint counted
        resumes exactly where the run stopped."""
        shard = ray.train.get_dataset_shard(train_shard_name(self.rank))
        while True:
            skip, seen = self.state.batches_in_epoch, 0
            for rows in iter_bucketed(shard, self.tc.micro_batch_size, self.cfg.data.bucket_pool_batches,
                                      seed=self.tc.seed + self.state.epoch, max_tokens=self.tc.micro_batch_tokens):
                seen += 1
                if seen > skip:
                    self.state.batches_in_epoch = seen  # counted when handed out: a checkpoint follows its step
                    yield rows
            if seen == 0:
                raise RuntimeError("the training split yielded no batches on this worker")
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    def train_step(self, window: list[list]) -> tuple[float, int]:
        """One optimizer step over `window` (grad_accum_steps micro batches): every label token of the global
        batch weighs the same, however tokens fall into micro batches and ranks. Returns the step's loss and
        the global batch's (unpadded) tokens."""
        batches = [_to(collate(rows, self.pad_id, self.audio_frames), self.device, self.dtype) for rows in window]
        counts = torch.tensor([[int((b["labels"][:, 1:] != IGNORE_INDEX).sum()), int(b["attention_mask"].sum())]
                               for b in batches], dtype=torch.float64).sum(0)
        dist.all_reduce(counts)
        n_global = max(float(counts[0]), 1.0)
        # DeepSpeed divides each micro batch's loss by grad_accum_steps and averages gradients over ranks:
        # scaling by both turns the sum of micro-batch sums into the global batch's token mean.
        scale = self.world * len(batches) / n_global
        total = torch.zeros(1, dtype=torch.float64)
        for batch in batches:
            loss_sum, _ = self.loss_sum(batch)
            self.engine.backward(loss_sum * scale)
            self.engine.step()
            total += float(loss_sum.detach())
        dist.all_reduce(total)
        self.state.samples_seen += sum(len(rows) for rows in window) * self.world
        return float(total[0]) / n_global, int(counts[1])

    def train(self) -> None:
        tc = self.tc
        metrics_log = MetricsLog(self.cfg.output_dir, self.state.step) if self.rank == 0 else None
        if metrics_log is not None and self.state.step > 0:
            metrics_log.log({"kind": "resume", "step": self.state.step, "epoch": self.state.epoch,
                             "batches_in_epoch": self.state.batches_in_epoch})
        node_ids: list = [None] * self.world  # which Ray node each rank runs on, in rank order
        dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
        if metrics_log is not None:
            metrics_log.log({"kind": "workers", "step": self.state.step, "node_ids": node_ids})
        samples = SampleLog(self.cfg.output_dir, self.rank, self.state.step) if tc.log_sample_ids else None
        meter = Meter(self.state.step, self.state.samples_seen)
        batches = self.micro_batches()
        self.engine.train()
        while self.state.step < tc.max_steps:
            with meter.waiting():
                window = [next(batches) for _ in range(tc.grad_accum_steps)]
            with meter.computing():
                loss, tokens = self.train_step(window)
            meter.tokens += tokens
            self.state.step += 1
            assert self.state.step == self.engine.global_steps, "DeepSpeed and the loop disagree on the step"
            if samples is not None:
                samples.write(self.state.step, [str(row["id"]) for rows in window for row in rows])
            self._after_step(loss, meter, metrics_log)
        for log_ in (metrics_log, samples):
            if log_ is not None:
                log_.close()

    def _after_step(self, loss: float, meter: "Meter", metrics_log: MetricsLog | None) -> None:
        tc, step = self.tc, self.state.step
        final = step >= tc.max_steps
        record: dict = {"kind": "train", "step": step, "loss": loss,
                        "lr": float(self.scheduler.get_last_lr()[0]) if self.scheduler else tc.learning_rate}
        if step % tc.log_every == 0 or final:
            record.update(meter.rates(step, self.state.samples_seen))
            if self.rank == 0:
                eta = meter.elapsed() / max(step - meter.start_step, 1) * (tc.max_steps - step)
                print(f"[train] step {step}/{tc.max_steps} | {record['samples_per_s']:.1f} samples/s | "
                      f"loss {loss:.4f} | lr {record['lr']:.2e} | data wait {record['data_wait_fraction']:.0%} | "
                      f"ETA {_fmt_eta(eta)}", flush=True)
                metrics_log.log(record)
        evaluate = step % tc.eval_every == 0 or final
        checkpoint = step % tc.checkpoint_every == 0 or final
        if not (evaluate or checkpoint):
            return
        meter.pause()  # evaluation and checkpoints are neither data wait nor step time
        # A checkpoint is scored by its validation loss (CheckpointConfig keeps the `keep_checkpoints` best), so
        # a checkpoint step measures it off the eval cadence too; caption scores only on eval steps.
        eval_record: dict = {"kind": "eval", "step": step, "eval_loss": self.validation_loss()}
        if evaluate and tc.eval_caption_clips > 0:
            eval_record.update(self.caption_scores())
        if self.rank == 0:
            print(f"[eval] step {step}: validation loss {eval_record['eval_loss']:.4f}", flush=True)
            metrics_log.log(eval_record)
        if checkpoint:
            self.save_and_report({"step": step, "loss": loss, **{k: v for k, v in eval_record.items()
                                                                   if k != "kind" and k != "step"}})
        meter.resume()


def checkpoints_newest_first(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """`latest` and the other checkpoints of its run (its siblings named checkpoint_*), newest first."""
    fs, path = latest.filesystem, latest.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:
        return [latest]
    names = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [latest] + [ray.train.Checkpoint(f"{parent}/{n}", filesystem=fs) for n in names]


class Meter:
    """Wall time split into waiting for data and computing, and the rates since the run (re)started;
    time inside `pause()`/`resume()` (evaluation, checkpoints) counts as neither."""

    def __init__(self, start_step: int, start_samples: int):
        self.start_step, self.start_samples = start_step, start_samples
        self.start = time.perf_counter()
        self.wait = self.compute = self.paused = 0.0
        self.tokens = 0  # of the global batches since the (re)start, padding excluded
        self._paused_at: float | None = None

    @contextmanager
    def _timed(self, attr: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, attr, getattr(self, attr) + time.perf_counter() - t)

    def waiting(self):
        return self._timed("wait")

    def computing(self):
        return self._timed("compute")

    def pause(self) -> None:
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self.paused += time.perf_counter() - self._paused_at
            self._paused_at = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def rates(self, step: int, samples_seen: int) -> dict:
        return {"samples_per_s": (samples_seen - self.start_samples) / max(self.elapsed(), 1e-9),
                "tokens_per_s": self.tokens / max(self.elapsed(), 1e-9),
                "data_wait_fraction": self.wait / max(self.wait + self.compute, 1e-9),
                "data_wait_s": round(self.wait, 4), "compute_s": round(self.compute, 4)}


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: loop_config holds the resolved Config (as a dict) and validation references."""
    worker = Worker(Config.model_validate(loop_config["config"]), loop_config["references"])
    worker.restore()
    if worker.state.step >= worker.tc.max_steps:
        return
    worker.train()

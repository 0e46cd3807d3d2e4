"""The per-worker training loop (Ray Train V2 + DeepSpeed + LoRA). Reads top to bottom:
setup -> restore -> train loop (log, evaluate, checkpoint) -> final checkpoint.

Every worker runs this function; Ray Train has already set up torch.distributed (gloo on CPU, NCCL on
GPU), which DeepSpeed joins. Data arrives pre-featurized from Ray Data shards.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import deepspeed
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from af3dist.config import Config
from af3dist.data.batching import collate, collate_prompts, iter_bucketed
from af3dist.data.features import IGNORE_INDEX, load_processor
from af3dist.inference import greedy_generate
from af3dist.metrics import caption_metrics
from af3dist.model.loading import load_model, resolve_dtype
from af3dist.training.deepspeed_config import lora_engine
from af3dist.training.state import (ADAPTER_DIR, DEEPSPEED_DIR, DEEPSPEED_TAG, MetricsLog, TrainerState)

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

        self.engine, self.scheduler = lora_engine(load_model(cfg.model.name_or_path, self.dtype), cfg.lora,
                                                  self.tc, self.world, self.dtype)
        self.state = TrainerState()

    # ------------------------------------------------------------------ checkpoints
    def restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            self.engine.load_checkpoint(str(Path(folder, DEEPSPEED_DIR)), tag=DEEPSPEED_TAG,
                                        load_module_strict=False)
            self.state = TrainerState.load(Path(folder))
        if self.rank == 0:
            print(f"[train] resumed from step {self.state.step} (epoch {self.state.epoch}, "
                  f"{self.state.batches_in_epoch} batches into it)", flush=True)

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
            batch = _to(collate(rows, self.pad_id), self.device, self.dtype)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += torch.tensor([float(self.engine(**batch).loss) * n, n], dtype=torch.float64)
        dist.all_reduce(total)
        self.engine.train()
        return float(total[0] / total[1]) if total[1] else float("nan")

    @torch.no_grad()
    def caption_scores(self) -> dict:
        self.engine.eval()
        predictions: dict[str, str] = {}
        shard = ray.train.get_dataset_shard("val_clips")
        for rows in iter_bucketed(shard, self.tc.micro_batch_size, 1, seed=0):
            batch = _to(collate_prompts(rows, self.pad_id), self.device, self.dtype)
            tokens = greedy_generate(self.engine.module, batch, self.tc.max_new_tokens, self.eos_id, self.pad_id,
                                     synced_gpus=self.tc.zero_stage == 3 and self.world > 1)
            for row, t in zip(rows, tokens):
                predictions[str(row["clip_id"])] = self.processor.tokenizer.decode(t, skip_special_tokens=True)
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
        shard = ray.train.get_dataset_shard("train")
        start = time.perf_counter()
        start_step = self.state.step
        wait = compute = 0.0
        last_loss = float("nan")
        self.engine.train()
        while self.state.step < tc.max_steps:
            skip = self.state.batches_in_epoch
            batches = iter_bucketed(shard, tc.micro_batch_size, self.cfg.data.bucket_pool_batches,
                                    seed=tc.seed + self.state.epoch)
            seen = 0
            t0 = time.perf_counter()
            for rows in batches:
                seen += 1
                if seen <= skip:  # resuming: this epoch's first batches were already trained on
                    t0 = time.perf_counter()
                    continue
                t1 = time.perf_counter()
                wait += t1 - t0
                batch = _to(collate(rows, self.pad_id), self.device, self.dtype)
                loss = self.engine(**batch).loss
                self.engine.backward(loss)
                steps_before = self.engine.global_steps
                self.engine.step()
                last_loss = float(loss)
                self.state.batches_in_epoch += 1
                self.state.samples_seen += len(rows) * self.world
                t0 = time.perf_counter()
                compute += t0 - t1
                if self.engine.global_steps == steps_before:  # inside a gradient accumulation window
                    continue
                self.state.step = self.engine.global_steps
                self._after_step(last_loss, start, start_step, wait, compute, metrics_log)
                t0 = time.perf_counter()  # evaluation and checkpoints are neither data wait nor step time
                if self.state.step >= tc.max_steps:
                    break
            else:  # the shard is exhausted: next epoch
                if seen == 0:
                    raise RuntimeError("the training split yielded no batches on this worker")
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
        if metrics_log is not None:
            metrics_log.close()

    def _after_step(self, loss: float, start: float, start_step: int, wait: float, compute: float,
                    metrics_log: MetricsLog | None) -> None:
        tc, step = self.tc, self.state.step
        final = step >= tc.max_steps
        record: dict = {"kind": "train", "step": step, "loss": loss,
                        "lr": float(self.scheduler.get_last_lr()[0]) if self.scheduler else tc.learning_rate}
        if step % tc.log_every == 0 or final:
            elapsed = time.perf_counter() - start
            done = step - start_step
            record["samples_per_s"] = done * tc.micro_batch_size * tc.grad_accum_steps * self.world / elapsed
            record["data_wait_fraction"] = wait / max(wait + compute, 1e-9)
            record["data_wait_s"], record["compute_s"] = round(wait, 4), round(compute, 4)
            if self.rank == 0:
                eta = elapsed / max(done, 1) * (tc.max_steps - step)
                print(f"[train] step {step}/{tc.max_steps} | {record['samples_per_s']:.1f} samples/s | "
                      f"loss {loss:.4f} | lr {record['lr']:.2e} | data wait {record['data_wait_fraction']:.0%} | "
                      f"ETA {_fmt_eta(eta)}", flush=True)
                metrics_log.log(record)
        evaluate = step % tc.eval_every == 0 or final
        checkpoint = step % tc.checkpoint_every == 0 or final
        if not (evaluate or checkpoint):
            return
        eval_record: dict = {"kind": "eval", "step": step, "eval_loss": self.validation_loss()}
        if evaluate and tc.eval_caption_clips > 0:
            eval_record.update(self.caption_scores())
        if self.rank == 0:
            print(f"[eval] step {step}: validation loss {eval_record['eval_loss']:.4f}", flush=True)
            metrics_log.log(eval_record)
        if checkpoint:
            self.save_and_report({"step": step, "loss": loss, **{k: v for k, v in eval_record.items()
                                                                   if k != "kind" and k != "step"}})


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: loop_config holds the resolved Config (as a dict) and validation references."""
    worker = Worker(Config.model_validate(loop_config["config"]), loop_config["references"])
    worker.restore()
    if worker.state.step >= worker.tc.max_steps:
        return
    worker.train()

"""The DeepSpeed side of a run: its config, built from our TrainConfig (one source of truth for batch,
optimizer, schedule and ZeRO settings), and the LoRA engine a worker trains."""

from __future__ import annotations

import deepspeed
import torch

from af3dist.config import LoraConfig, TrainConfig
from af3dist.model.loading import add_lora, enable_gradient_checkpointing


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16: bool) -> dict:
    """ZeRO 2/3 with AdamW and warmup + cosine or linear decay over cfg.max_steps optimizer steps."""
    if cfg.lr_schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.max_steps, "warmup_num_steps": cfg.warmup_steps,
            "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1, "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": cfg.max_steps, "warmup_num_steps": cfg.warmup_steps,
            "warmup_min_lr": 0.0, "warmup_max_lr": cfg.learning_rate, "warmup_type": "linear"}}
    zero: dict = {"stage": cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": cfg.use_gpu}
    if cfg.zero_stage == 3:
        # Gather full 16-bit weights when saving, or the saved LoRA adapter comes out empty.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": cfg.weight_decay,
            "torch_adam": True}},
        "scheduler": scheduler,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def lora_engine(model: torch.nn.Module, lora: LoraConfig, cfg: TrainConfig, world_size: int, dtype: torch.dtype,
                gradient_checkpointing: bool):
    """LoRA on `model` (with gradient checkpointing when asked: `training.memory` decides for "auto") inside a
    DeepSpeed engine that optimizes only the trainable weights. Returns (engine, lr scheduler).
    torch.distributed must already be set up."""
    model = add_lora(model, lora)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, world_size, bf16=dtype == torch.bfloat16))
    return engine, scheduler

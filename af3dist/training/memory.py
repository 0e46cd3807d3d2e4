"""Choosing activation checkpointing by memory: recompute only when the activations would not fit.

Checkpointing re-runs every layer's forward in the backward pass: on full-size AF3 that is ~27% of the work
a step runs, credited to nothing. It is worth paying only where the activations of a micro batch would not
fit the GPU. `train.gradient_checkpointing: auto` estimates them from the micro batch's worst-case tokens
and the language model's sizes, and turns checkpointing off when they fit with headroom.
"""

from __future__ import annotations

import torch

# Audio tokens a second of sound becomes in AF3 (750 per 30 s window) and a bound on the text around it
# (system prompt, user prompt, role tags, a caption).
AUDIO_TOKENS_PER_SECOND = 25
TEXT_TOKENS = 96
HEADROOM = 1.25          # the estimate times this must fit...
RESERVE_BYTES = 4 << 30  # ...in what is free after loading the model, less this (allocator, NCCL, LoRA state)


def micro_batch_tokens(micro_batch_size: int, max_audio_seconds: float, token_budget: int | None) -> int:
    """The most tokens (padded) one micro batch can hold."""
    worst_row = int(max_audio_seconds * AUDIO_TOKENS_PER_SECOND) + TEXT_TOKENS
    return token_budget if token_budget else micro_batch_size * worst_row


def activation_bytes(text_config, tokens: int, dtype_bytes: int = 2) -> int:
    """Activations a transformer decoder keeps for the backward pass without recompute, with fused (SDPA)
    attention so nothing is quadratic: per token and layer the inputs of every matmul and norm, i.e. ~8
    hidden-sized and 4 MLP-sized vectors (Megatron's accounting with Qwen's gated MLP), plus LoRA's dropout
    copies of the 7 targets' inputs."""
    h, i = text_config.hidden_size, text_config.intermediate_size
    per_token_layer = dtype_bytes * (8 * h + 4 * i + 7 * h)
    return tokens * text_config.num_hidden_layers * per_token_layer


def choose_gradient_checkpointing(setting: bool | str, text_config, tokens: int,
                                  device: torch.device) -> tuple[bool, str]:
    """(checkpointing on?, why) for `train.gradient_checkpointing` = True, False or "auto"."""
    if setting is not True and setting is not False and setting != "auto":
        raise ValueError(f"gradient_checkpointing must be true, false or auto, not {setting!r}")
    if setting != "auto":
        return bool(setting), f"train.gradient_checkpointing={str(setting).lower()}"
    if device.type != "cuda":
        return False, "auto: off on CPU (activations live in host memory; recompute would only cost time)"
    need = activation_bytes(text_config, tokens)
    free, total = torch.cuda.mem_get_info(device)
    fits = need * HEADROOM < free - RESERVE_BYTES
    gib = 2 ** 30
    why = (f"auto: {'off' if fits else 'on'}: the activations of a micro batch of up to {tokens} tokens need "
           f"~{need / gib:.1f} GiB (x{HEADROOM} headroom), {free / gib:.1f} of {total / gib:.1f} GiB are free")
    return not fits, why

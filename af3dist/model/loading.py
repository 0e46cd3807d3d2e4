"""Load AF3 (base, base + LoRA adapter, or merged) and prepare it for LoRA fine-tuning.

The same functions load the hub checkpoint and the tiny stand-in: `from_pretrained` on a name or path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AudioFlamingo3ForConditionalGeneration

from af3dist.config import LoraConfig
from af3dist.model.encoder import skip_audio_padding

PROJECTOR = "multi_modal_projector"
ADAPTER_CONFIG = "adapter_config.json"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16}


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and lossy for tiny models)."""
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return _DTYPES[name]


def is_adapter(path: str) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str) -> str:
    """The base model an adapter folder was trained on, as recorded in its adapter_config.json."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def resolve_model(model: str, adapter: str | None = None) -> tuple[str, str | None, str]:
    """(base or merged model, adapter or None, processor folder) for a model folder / hub id, an adapter
    folder given as the model, or a model plus an adapter. The adapter's processor wins when it was saved
    with one."""
    from af3dist.data.features import load_processor

    processor_source = str(adapter or model)
    if is_adapter(model) and adapter is None:
        adapter, model = model, adapter_base(model)
    try:
        load_processor(processor_source)
    except (OSError, ValueError):  # an adapter folder saved without processor files
        processor_source = str(model)
    return model, adapter, processor_source


def avoid_cudnn_attention() -> bool:
    """On CUDA, take cuDNN out of PyTorch's SDPA backends (flash / memory-efficient attention remain).

    Why: with a padding mask, torch 2.11 on Hopper sends attention to cuDNN first, and cuDNN builds a new
    execution plan for every new (batch, length) shape. Our shapes change all the time (length-bucketed
    training batches, and every decoding step's longer KV cache): on an H200 that cost about 0.12 s per
    generated token with the full-size model. Process-wide, so every model this process loads gains.
    Returns whether it changed anything (False without CUDA)."""
    if not torch.cuda.is_available() or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, adapter: str | None = None):
    """A base or merged model, or base + adapter (peft) when `adapter` is given or the path is an adapter.

    The audio encoder skips the padding of its 30 s windows (`skip_audio_padding`): same outputs, less work;
    and on CUDA, attention avoids cuDNN's per-shape plans (`avoid_cudnn_attention`).
    """
    avoid_cudnn_attention()
    if adapter is None and is_adapter(name_or_path):
        adapter, name_or_path = name_or_path, adapter_base(name_or_path)
    model = skip_audio_padding(AudioFlamingo3ForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model


def lora_target_pattern(cfg: LoraConfig) -> str:
    """A peft `target_modules` regex (matched in full against module names) limited to cfg.scope."""
    scopes = ["language_model"] + (["audio_tower"] if cfg.scope == "language_model+audio_tower" else [])
    names = "|".join(re.escape(m) for m in cfg.target_modules)
    return rf".*\.({'|'.join(scopes)})\..*\.({names})"


def add_lora(model: AudioFlamingo3ForConditionalGeneration, cfg: LoraConfig) -> PeftModel:
    """Freeze everything, then add LoRA to the scoped targets and (optionally) train the projector fully."""
    for p in model.parameters():
        p.requires_grad_(False)
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=lora_target_pattern(cfg),
        modules_to_save=[PROJECTOR] if cfg.train_projector else None,
    )
    return get_peft_model(model, peft_cfg)


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing with input grads on: the combination that works with frozen
    embeddings under PEFT (reentrant checkpointing sees no tensor requiring grad and drops the graph)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False

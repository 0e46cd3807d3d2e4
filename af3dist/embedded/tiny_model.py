"""The embedded stand-in for nvidia/audio-flamingo-3-hf: the real transformers classes at tiny sizes.

Nothing can be downloaded on a laptop without network, so `build_tiny_model` writes an ordinary HF folder
(config, safetensors, processor, tokenizer, chat template, generation config) that
`AutoProcessor.from_pretrained` and `AudioFlamingo3ForConditionalGeneration.from_pretrained` load offline,
with the same special tokens, template shape and generation defaults as the real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AudioFlamingo3Config,
    AudioFlamingo3EncoderConfig,
    AudioFlamingo3ForConditionalGeneration,
    AudioFlamingo3Processor,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    WhisperFeatureExtractor,
)

from af3dist.config import TinyModelConfig
from af3dist.storage import building_folder

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SOUND_TOKEN = "<sound>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, SOUND_TOKEN]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
MARKER_FILE = "af3dist_tiny.json"

# Same shape as the AF3 processor template: a default system turn, one <sound> per message that has
# audio, placed before that message's text, and `<|im_start|>assistant\n` as the generation prompt.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% set has_audio = namespace(v=false) %}{% set text = namespace(v='') %}"
    "{% for part in message['content'] %}"
    "{% if part.get('type') == 'audio' or 'audio' in part %}{% set has_audio.v = true %}"
    "{% elif part.get('type') == 'text' or 'text' in part %}{% set text.v = text.v + part['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if has_audio.v %}{{ '<sound>' }}{% endif %}{{ text.v }}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(set(corpus)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=None,
        bos_token=None,
        extra_special_tokens=[IM_START, SOUND_TOKEN],
        model_max_length=32768,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def _model_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> AudioFlamingo3Config:
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    audio = AudioFlamingo3EncoderConfig(
        num_mel_bins=128,
        hidden_size=cfg.audio_hidden_size,
        num_hidden_layers=cfg.audio_layers,
        num_attention_heads=cfg.audio_heads,
        intermediate_size=cfg.audio_intermediate_size,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    return AudioFlamingo3Config(
        audio_config=audio, text_config=text, audio_token_id=tokenizer.convert_tokens_to_ids(SOUND_TOKEN)
    )


def _marker(cfg: TinyModelConfig, corpus: list[str]) -> dict:
    return {"tiny_model": cfg.model_dump(), "corpus_size": len(set(corpus))}


def build_tiny_model(out_dir: str | Path, cfg: TinyModelConfig, corpus: list[str],
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write a randomly initialised tiny AF3 and its processor to `out_dir`, deterministically from cfg.seed.

    `corpus` is the text the byte-level BPE is trained on (captions, prompts); any text still encodes,
    byte by byte, so the tokenizer is complete. The folder is built aside and moved in whole. The sizes in
    `cfg` may be the real model's (benchmarks/gpu_real_job.py builds a full-size random AF3 this way, saved
    in bf16 via `dtype`).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(corpus + [DEFAULT_SYSTEM_PROMPT, "system user assistant"], cfg.vocab_size)
    processor = AudioFlamingo3Processor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(cfg.seed)
    model = AudioFlamingo3ForConditionalGeneration(_model_config(cfg, tokenizer))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, cfg.output_init_std)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    # The real checkpoint samples by default; keep that so callers must ask for greedy explicitly.
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id,
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
    )

    model = model.to(dtype)
    with building_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(_marker(cfg, corpus), indent=2))
    return out_dir


def ensure_tiny_model(out_dir: str | Path, cfg: TinyModelConfig, corpus: list[str]) -> Path:
    """Build the tiny model unless `out_dir` already holds one built from the same settings."""
    marker = Path(out_dir) / MARKER_FILE
    if marker.is_file() and json.loads(marker.read_text()) == _marker(cfg, corpus):
        return Path(out_dir)
    return build_tiny_model(out_dir, cfg, corpus)

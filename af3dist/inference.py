"""Caption audio with AF3: base, base + LoRA adapter, or merged model.

`Captioner` replaces the upstream guide's `pipeline("audio-text-to-text")`, which transformers 5.24 does
not have. Clips may be file paths, encoded bytes, or arrays at any sampling rate; they are captioned in
length-sorted batches with greedy decoding, so a batch gives the same tokens as one clip at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch

from af3dist.data.audio import TARGET_SAMPLING_RATE, load_waveform, read_audio_file, waveform_from_array
from af3dist.data.features import Featurizer, load_processor
from af3dist.model.loading import load_model, resolve_dtype, resolve_model

log = logging.getLogger(__name__)

# A clip: a path, encoded bytes, a 16 kHz array, or (array, sampling_rate).
Clip = Union[str, Path, bytes, np.ndarray, tuple]

DEFAULT_PROMPT = "Describe the audio."


def unwrap(model):
    """The underlying transformers model of a peft/DeepSpeed wrapper, for generation settings."""
    return getattr(model, "module", model)


@torch.no_grad()
def generate_tokens(model, inputs: dict[str, torch.Tensor], max_new_tokens: int, eos_token_id: int,
                    pad_token_id: int, temperature: float = 0.0, top_p: float = 1.0,
                    synced_gpus: bool = False) -> list[tuple[list[int], bool]]:
    """New tokens per row (no prompt, nothing from the first <|im_end|> on) and whether the row ended with
    <|im_end|> before `max_new_tokens`. Greedy at temperature 0, else nucleus sampling (seed the torch RNG
    first for reproducible samples). Every generation knob is passed explicitly so that the checkpoint's
    own generation_config (sampling, for the real AF3) never changes what we asked for."""
    sampling = temperature > 0
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=1,
                         temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                         top_k=0 if sampling else None, repetition_penalty=None,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
                         synced_gpus=synced_gpus)
    result = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        finished = eos_token_id in row
        if finished:
            row = row[: row.index(eos_token_id)]
        result.append(([t for t in row if t != pad_token_id], finished))
    return result


def greedy_generate(model, inputs: dict[str, torch.Tensor], max_new_tokens: int, eos_token_id: int,
                    pad_token_id: int, synced_gpus: bool = False) -> list[list[int]]:
    """Greedy new tokens per row, without the prompt and without anything after the first <|im_end|>."""
    return [tokens for tokens, _ in generate_tokens(model, inputs, max_new_tokens, eos_token_id, pad_token_id,
                                                     synced_gpus=synced_gpus)]


def to_waveform(clip: Clip, sampling_rate: int | None = None, max_seconds: float | None = None) -> np.ndarray:
    """Any supported clip form -> 16 kHz mono float32 (raises ClipError with a reason when it can't)."""
    if isinstance(clip, (str, Path)):
        return load_waveform(read_audio_file(str(clip)), max_seconds=max_seconds)
    if isinstance(clip, (bytes, bytearray, memoryview)):
        return load_waveform(bytes(clip), max_seconds=max_seconds)
    if isinstance(clip, tuple):
        array, rate = clip
        return waveform_from_array(array, rate)
    return waveform_from_array(clip, sampling_rate or TARGET_SAMPLING_RATE)


class Captioner:
    """Batched greedy captioning with an AF3 model and its processor."""

    def __init__(self, model, processor, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64,
                 device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.featurizer = Featurizer(processor, prompt)
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        tok = processor.tokenizer
        self.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_token_id = tok.pad_token_id

    @classmethod
    def load(cls, model: str, adapter: str | None = None, dtype: str = "auto", device: str | None = None,
             prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64) -> "Captioner":
        """`model`: base or merged folder / hub id, or an adapter folder (its base is read from it)."""
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        model, adapter, processor_source = resolve_model(model, adapter)
        return cls(load_model(model, resolve_dtype(dtype, on_gpu), adapter), load_processor(processor_source),
                   prompt, max_new_tokens, device)

    def inputs_for(self, waveforms: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [self.featurizer.render(p) for p in prompts]
        batch = self.processor(text=list(texts), audio=list(waveforms))
        return {k: v.to(self.device) for k, v in batch.items()}

    def caption_waveforms(self, waveforms: Sequence[np.ndarray], prompts: Sequence[str] | None = None,
                          batch_size: int = 8) -> list[str]:
        """16 kHz waveforms -> captions, batched in order of length to keep padding low."""
        prompts = list(prompts or [self.featurizer.prompt] * len(waveforms))
        order = sorted(range(len(waveforms)), key=lambda i: len(waveforms[i]))
        captions: list[str] = [""] * len(waveforms)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            inputs = self.inputs_for([waveforms[i] for i in idx], [prompts[i] for i in idx])
            tokens = greedy_generate(self.model, inputs, self.max_new_tokens, self.eos_token_id, self.pad_token_id)
            for i, t in zip(idx, tokens):
                captions[i] = self.processor.tokenizer.decode(t, skip_special_tokens=True).strip()
        return captions

    def caption(self, clips: Clip | Sequence[Clip], prompt: str | None = None, batch_size: int = 8,
                sampling_rate: int | None = None) -> str | list[str]:
        """Caption one clip (returns a string) or many (returns a list, in input order)."""
        single = isinstance(clips, (str, Path, bytes, tuple)) or (isinstance(clips, np.ndarray) and clips.ndim == 1)
        items = [clips] if single else list(clips)
        waveforms = [to_waveform(c, sampling_rate) for c in items]
        out = self.caption_waveforms(waveforms, [prompt or self.featurizer.prompt] * len(waveforms), batch_size)
        return out[0] if single else out


class CaptionPredictor:
    """A Ray Data callable class: featurized rows in, a `prediction` column out (greedy, batched by length).

    One instance holds one model; `map_batches(CaptionPredictor, concurrency=N)` makes an actor pool.
    """

    def __init__(self, model: str, adapter: str | None = None, dtype: str = "auto", max_new_tokens: int = 64,
                 batch_size: int = 8, device: str | None = None):
        self.captioner = Captioner.load(model, adapter=adapter, dtype=dtype, device=device,
                                        max_new_tokens=max_new_tokens)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from af3dist.data.batching import collate_prompts, length_key, rows_of

        c = self.captioner
        rows = rows_of(batch)
        order = sorted(range(len(rows)), key=lambda i: length_key(rows[i]))
        predictions = [""] * len(rows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            inputs = collate_prompts([rows[i] for i in idx], c.pad_token_id)
            inputs = {k: v.to(c.device) for k, v in inputs.items()}
            if c.model.dtype != torch.float32:
                inputs["input_features"] = inputs["input_features"].to(c.model.dtype)
            tokens = greedy_generate(c.model, inputs, c.max_new_tokens, c.eos_token_id, c.pad_token_id)
            for i, t in zip(idx, tokens):
                predictions[i] = c.processor.tokenizer.decode(t, skip_special_tokens=True).strip()
        keep = [k for k in ("id", "clip_id", "caption", "duration_s") if k in batch]
        return {**{k: batch[k] for k in keep}, "prediction": np.array(predictions, dtype=object)}

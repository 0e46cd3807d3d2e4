"""Turn a 16 kHz waveform (and its caption) into AF3 model inputs with the model's own processor.

The processor computes the log-mel windows, renders the chat template and expands `<sound>` to one
token per audio frame. Training labels are built here: the loss covers the assistant's caption and its
closing `<|im_end|>` only (the processor's `output_labels=True` would also train on the system prompt,
the user prompt and the role tags).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AutoProcessor, WhisperFeatureExtractor

from af3dist.data.audio import ClipError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: its role (system, user or assistant), its text, and how many audio clips
    it carries. The clips stand before the text, as AF3 was trained to read them."""

    role: str
    text: str
    audios: int = 0


def chat_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """Turns in the shape the chat template reads: a turn with audio as a list of audio placeholders and its
    text, a turn without as its text alone."""
    return [{"role": t.role, "content": [{"type": "audio"}] * t.audios + [{"type": "text", "text": t.text}]}
            if t.audios else {"role": t.role, "content": t.text} for t in turns]


def conversation(prompt: str, caption: str | None = None) -> list[dict[str, Any]]:
    """One user turn (audio, then prompt text) and, for training, the assistant's caption."""
    turns = [Turn("user", prompt, 1)] + ([Turn("assistant", caption)] if caption is not None else [])
    return chat_messages(turns)


class FastWhisperFeatureExtractor(WhisperFeatureExtractor):
    """Whisper's log-mel features, computed only where a 30 s window holds sound.

    The processor zero-pads every clip to a 30 s window and the stock extractor transforms the padding too:
    for a 10 s clip two thirds of the work yields frames of a known constant. Here the STFT and mel
    projection run on the frames that touch non-zero samples; the rest get the value the full computation
    gives silence. Same output (to float rounding) for any input, a fraction of the CPU for short clips.
    """

    def to_dict(self) -> dict:
        # Saved folders name the stock class, so plain transformers loads what we save.
        return {**super().to_dict(), "feature_extractor_type": WhisperFeatureExtractor.__name__}

    def _torch_extract_fbank_features(self, waveform: np.ndarray, device: str = "cpu") -> np.ndarray:
        if self.dither != 0.0 or device != "cpu" or waveform.ndim != 2:
            return super()._torch_extract_fbank_features(waveform, device)
        n_samples = waveform.shape[1]
        n_frames = n_samples // self.hop_length  # the stock extractor drops the STFT's last frame
        half = self.n_fft // 2
        window = torch.hann_window(self.n_fft)
        mel_filters = torch.from_numpy(self.mel_filters).to(torch.float32)
        silence = float(torch.tensor(1e-10, dtype=torch.float32).log10())
        out = np.empty((waveform.shape[0], self.mel_filters.shape[1], n_frames), dtype=np.float32)
        for i, row in enumerate(waveform):
            nonzero = np.flatnonzero(row)
            length = int(nonzero[-1]) + 1 if nonzero.size else 0
            if length > n_samples - self.n_fft:  # sound near the window's end meets the STFT's reflect padding
                out[i] = super()._torch_extract_fbank_features(row[None], device)[0]
                continue
            k = min(n_frames, -(-(length + half) // self.hop_length))  # frames that see a non-zero sample
            log_spec = torch.empty((out.shape[1], k))
            if k:
                x = torch.zeros(k * self.hop_length + self.n_fft, dtype=torch.float32)
                x[:length] = torch.from_numpy(row[:length])
                stft = torch.stft(x, self.n_fft, self.hop_length, window=window, return_complex=True)[..., :k]
                log_spec[:, :k] = torch.clamp(mel_filters.T @ (stft.abs() ** 2).contiguous(), min=1e-10).log10()
            # Same float32 arithmetic as the stock extractor: peak over the whole window, floor 8 below it.
            peak = log_spec[:, :k].max() if k else torch.tensor(silence)
            if k < n_frames:
                peak = torch.maximum(peak, torch.tensor(silence))
            floor = peak - 8.0
            out[i, :, :k] = ((torch.maximum(log_spec[:, :k], floor) + 4.0) / 4.0).numpy()
            out[i, :, k:] = float((torch.maximum(torch.tensor(silence), floor) + 4.0) / 4.0)
        return out


@functools.lru_cache(maxsize=4)
def load_processor(name_or_path: str):
    """One processor per process (Ray reuses worker processes across tasks), with the Whisper feature
    extractor swapped for FastWhisperFeatureExtractor (same features, less CPU on short clips)."""
    processor = AutoProcessor.from_pretrained(name_or_path)
    extractor = processor.feature_extractor
    if type(extractor) is WhisperFeatureExtractor:
        processor.feature_extractor = FastWhisperFeatureExtractor.from_dict(extractor.to_dict())
    return processor


class Featurizer:
    """Builds per-clip model inputs; the training collate only stacks and pads them."""

    def __init__(self, processor, prompt: str):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt = prompt
        self.audio_token_id = processor.audio_token_id
        self.eos_token_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_token_id = self.tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, name_or_path: str, prompt: str) -> "Featurizer":
        return cls(load_processor(name_or_path), prompt)

    def render(self, prompt: str | None = None, caption: str | None = None) -> str:
        """Chat text: with a caption, the whole exchange; without, the prompt ready for generation."""
        return self.render_messages(conversation(prompt or self.prompt, caption), add_generation_prompt=caption is None)

    def render_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The one place a conversation becomes chat text: the model's own chat template (its default system
        prompt when there is none, one `<sound>` per message that has audio, or per clip, before the text)."""
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _single(self, waveform: np.ndarray, text: str) -> dict[str, np.ndarray]:
        out = self.processor(text=[text], audio=[waveform])
        return {
            "input_ids": out["input_ids"][0].numpy().astype(np.int32),
            "input_features": out["input_features"].numpy(),
            "input_features_mask": out["input_features_mask"].numpy().astype(bool),
        }

    def _expanded(self, text: str, waveforms: Sequence[np.ndarray], per_message: Sequence[int]
                  ) -> dict[str, np.ndarray]:
        """Model inputs for chat text holding several clips (AF3's processor takes one clip per text): the
        clips' log-mel windows in order, and each `<sound>` of the text expanded to its clips' token runs, as
        the processor expands one. The template writes one `<sound>` per clip or one per message with audio
        (`per_message`: clips per such message); either way the runs follow one another in clip order."""
        sound = self.processor.audio_token
        out = self.processor(text=[sound] * len(waveforms), audio=list(waveforms))
        runs = [int(n) for n in (out["input_ids"] == self.audio_token_id).sum(-1)]
        pieces = text.split(sound)
        if len(pieces) - 1 == len(runs):
            groups = [[n] for n in runs]
        elif len(pieces) - 1 == len(per_message):
            bounds = np.cumsum([0, *per_message])
            groups = [runs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            raise RuntimeError(f"the chat template wrote {len(pieces) - 1} {sound} for {len(runs)} clips")
        expanded = pieces[0] + "".join(sound * sum(g) + piece for g, piece in zip(groups, pieces[1:]))
        ids = np.asarray(self.tokenizer(expanded)["input_ids"], dtype=np.int32)
        if int((ids == self.audio_token_id).sum()) != sum(runs):
            raise RuntimeError("the expanded chat text does not tokenize to its audio runs")
        return {"input_ids": ids, "input_features": out["input_features"].numpy(),
                "input_features_mask": out["input_features_mask"].numpy().astype(bool)}

    def training_example(self, waveform: np.ndarray, caption: str, prompt: str | None = None) -> dict[str, Any]:
        """input_ids, labels (-100 outside the caption + <|im_end|>), log-mel windows and their mask."""
        caption = caption.strip()
        if not caption:
            raise ClipError("empty_caption", "the caption is empty")
        example = self._single(waveform, self.render(prompt, caption))
        ids = example["input_ids"]
        n_sound = int((ids == self.audio_token_id).sum())
        prefix = self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"]
        expanded = []
        for t in prefix:
            expanded.extend([t] * n_sound if t == self.audio_token_id else [t])
        n_prefix = len(expanded)
        if ids[:n_prefix].tolist() != expanded:
            raise RuntimeError("the chat template's prompt is not a token prefix of the full exchange; "
                               "labels cannot be placed")
        end = n_prefix + int(np.argmax(ids[n_prefix:] == self.eos_token_id)) + 1
        if ids[end - 1] != self.eos_token_id:
            raise RuntimeError("the chat template does not close the assistant turn with <|im_end|>")
        labels = np.full_like(ids, IGNORE_INDEX)
        labels[n_prefix:end] = ids[n_prefix:end]
        example["labels"] = labels
        return example

    def generation_inputs(self, waveform: np.ndarray, prompt: str | None = None) -> dict[str, np.ndarray]:
        """Inputs for `generate`: the prompt with the generation prompt appended, no labels."""
        return self.conversation_inputs([Turn("user", prompt or "", 1)], [waveform])

    def conversation_inputs(self, turns: Sequence[Turn], waveforms: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs for `generate` from a whole conversation (system prompt, earlier turns, the assistant's
        replies) and its clips in order of appearance, rendered by the chat template with the generation prompt
        appended. A user turn that carries audio but no text asks the default prompt. With one clip this is the
        processor's own featurization, token for token what training and `generation_inputs` always made."""
        turns = [Turn(t.role, self.prompt, t.audios) if t.audios and t.role == "user" and not t.text
                 else t for t in turns]
        per_message = [t.audios for t in turns if t.audios]
        if sum(per_message) != len(waveforms) or not waveforms:
            raise ValueError(f"the turns carry {sum(per_message)} clips and {len(waveforms)} were given "
                             "(at least one is needed)")
        text = self.render_messages(chat_messages(turns))
        if len(waveforms) == 1:
            return self._single(waveforms[0], text)
        return self._expanded(text, waveforms, per_message)

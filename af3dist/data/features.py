"""Turn a 16 kHz waveform (and its caption) into AF3 model inputs with the model's own processor.

The processor computes the log-mel windows and the `<sound>` count of each clip, its chat template renders
the text, and `<sound>` is expanded to one token per audio frame. Training labels are built here: the loss
covers the assistant's caption and its closing `<|im_end|>` only (the processor's `output_labels=True` would also train on the system prompt,
the user prompt and the role tags).
"""

from __future__ import annotations

import functools
import re
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
            sounding = row != 0
            length = n_samples - int(np.argmax(sounding[::-1])) if sounding.any() else 0  # after the last sound
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


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """A pattern matching the text of any of the tokenizer's special or added tokens (`<sound>`, `<|im_start|>`,
    ...): in prompt or caption text it would be read as that token and break the audio expansion, the chat
    template or the labels. None when the tokenizer has none."""
    added = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    tokens = sorted((t for t in added if t), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


class Featurizer:
    """Builds per-clip model inputs; the training collate only stacks and pads them.

    The audio goes through the processor's own audio path (windows, log-mel, `<sound>` counts); the chat text is
    tokenized with one `<sound>` per clip (or per message), each then expanded into its clip's run of
    `<sound>` ids. `<sound>` is an added token, which the tokenizer splits out before anything else, so this
    gives the processor's own ids (tested against it) without tokenizing the hundreds of `<sound>` a clip
    expands to."""

    def __init__(self, processor, prompt: str):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt = prompt
        self.audio_token_id = processor.audio_token_id
        self.eos_token_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_token_id = self.tokenizer.pad_token_id
        self.special_tokens = special_token_pattern(self.tokenizer)
        # The processor's own keyword arguments for its audio path (its defaults, merged once).
        self._audio_kwargs = processor._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs)["audio_kwargs"]
        self._prompt_ids: dict[str, np.ndarray] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str, prompt: str) -> "Featurizer":
        """One featurizer per (processor, prompt) and process: data tasks call this for every batch."""
        return _featurizer(cls, name_or_path, prompt)

    def special_token_in(self, text: str) -> str | None:
        """The first special or added token's text found in `text`, if any."""
        found = self.special_tokens.search(text) if self.special_tokens else None
        return found.group(0) if found else None

    def render(self, prompt: str | None = None, caption: str | None = None) -> str:
        """Chat text: with a caption, the whole exchange; without, the prompt ready for generation."""
        return self.render_messages(conversation(prompt or self.prompt, caption), add_generation_prompt=caption is None)

    def render_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The one place a conversation becomes chat text: the model's own chat template (its default system
        prompt when there is none, one `<sound>` per message that has audio, or per clip, before the text)."""
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _audio(self, waveforms: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The processor's audio path: every clip's 30 s log-mel windows in order, their masks, and each clip's
        count of `<sound>` tokens."""
        out, _ = self.processor._process_audio(list(waveforms), **self._audio_kwargs)
        return (np.asarray(out["input_features"]), np.asarray(out["input_features_mask"]).astype(bool),
                [int(n) for n in out["num_audio_tokens"]])

    def _inputs(self, text: str, waveforms: Sequence[np.ndarray], per_message: Sequence[int]) -> dict[str, np.ndarray]:
        """Model inputs for chat text and its clips: each `<sound>` of the text expanded to its clips' runs, as
        the processor expands one. The template writes one `<sound>` per clip or one per message with audio
        (`per_message`: clips per such message); either way the runs follow one another in clip order."""
        features, mask, runs = self._audio(waveforms)
        ids = np.asarray(self.tokenizer(text)["input_ids"], dtype=np.int32)
        where = np.flatnonzero(ids == self.audio_token_id)
        if len(where) == len(runs):
            counts = runs
        elif len(where) == len(per_message):
            bounds = np.cumsum([0, *per_message])
            counts = [sum(runs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            raise RuntimeError(f"the chat text holds {len(where)} {self.processor.audio_token} for {len(runs)} clips")
        return {"input_ids": _expand(ids, where, counts, self.audio_token_id), "input_features": features,
                "input_features_mask": mask}

    def _prompt_prefix(self, prompt: str) -> np.ndarray:
        """The ids of the prompt ready for generation (one `<sound>`): what precedes every caption's labels."""
        if prompt not in self._prompt_ids:
            if (token := self.special_token_in(prompt)) is not None:
                raise ValueError(f"the prompt holds {token!r}, the text of one of the model's special tokens")
            ids = self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"]
            self._prompt_ids[prompt] = np.asarray(ids, dtype=np.int32)
        return self._prompt_ids[prompt]

    def training_example(self, waveform: np.ndarray, caption: str, prompt: str | None = None) -> dict[str, Any]:
        """input_ids, labels (-100 outside the caption + <|im_end|>), log-mel windows and their mask."""
        caption = caption.strip()
        if not caption:
            raise ClipError("empty_caption", "the caption is empty")
        if (token := self.special_token_in(caption)) is not None:
            raise ClipError("special_token_in_caption",
                            f"the caption holds {token!r}, the text of one of the model's special tokens")
        prefix = self._prompt_prefix(prompt or self.prompt)
        features, mask, runs = self._audio([waveform])
        ids = np.asarray(self.tokenizer(self.render(prompt, caption))["input_ids"], dtype=np.int32)
        n_prefix = len(prefix)
        if not np.array_equal(ids[:n_prefix], prefix):
            raise RuntimeError("the chat template's prompt is not a token prefix of the full exchange; "
                               "labels cannot be placed")
        end = n_prefix + int(np.argmax(ids[n_prefix:] == self.eos_token_id)) + 1
        if ids[end - 1] != self.eos_token_id:
            raise RuntimeError("the chat template does not close the assistant turn with <|im_end|>")
        where = np.flatnonzero(ids == self.audio_token_id)
        if len(where) != 1 or where[0] >= n_prefix:
            raise RuntimeError(f"the chat text holds {len(where)} {self.processor.audio_token} for one clip")
        labels = np.full_like(ids, IGNORE_INDEX)
        labels[n_prefix:end] = ids[n_prefix:end]
        return {"input_ids": _expand(ids, where, runs, self.audio_token_id),
                "labels": _expand(labels, where, runs, IGNORE_INDEX),
                "input_features": features, "input_features_mask": mask}

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
        return self._inputs(self.render_messages(chat_messages(turns)), waveforms, per_message)


@functools.lru_cache(maxsize=8)
def _featurizer(cls: type, name_or_path: str, prompt: str) -> Featurizer:
    return cls(load_processor(name_or_path), prompt)


def _expand(ids: np.ndarray, where: np.ndarray, counts: Sequence[int], fill: int) -> np.ndarray:
    """`ids` with the element at each of `where` replaced by `counts[i]` copies of `fill`."""
    pieces, start = [], 0
    for at, n in zip(where, counts):
        pieces += [ids[start:at], np.full(n, fill, dtype=ids.dtype)]
        start = at + 1
    pieces.append(ids[start:])
    return np.concatenate(pieces)

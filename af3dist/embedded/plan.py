"""Planning a synthetic AudioCaps split: one `ClipSpec` per clip (label, format, rate, channels, length, ids,
captions), deterministic from the seed, with no audio synthesised until a spec is rendered.

By default clips cycle through every format, rate and channel count and a few are longer than 30 s, so the
loader's decode/resample/downmix/crop paths all get exercised; `fixed` pins any of them (benchmarks want
clips of one format, rate and length).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import numpy as np

from af3dist.embedded.captions import SOUND_CLASSES, all_labels, captions_for, split_label
from af3dist.embedded.encoding import FORMATS, encode_audio
from af3dist.embedded.sounds import LEVEL_RANGE, generate_clip

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Split names, in the order AudioCaps uses them."""

SAMPLE_RATES: tuple[int, ...] = (16000, 22050, 44100, 48000)
"""Sample rates the generator cycles through."""

CHANNELS: tuple[int, ...] = (1, 2)
"""Channel counts the generator cycles through (mono, stereo)."""

REFS_PER_EVAL_CLIP = 5
"""Reference captions (= rows) per clip in validation/test, as in AudioCaps."""

SHORT_DURATION_S = (1.0, 10.0)
LONG_DURATION_S = (31.0, 40.0)

# Fraction of clips that are two-event sequences: every third clip.
_SEQUENCE_EVERY = 3
_SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}
# audiocap_id ranges per split never overlap (ids grow by 1..7 per row).
_ID_BASE = {"train": 1, "validation": 100_000_001, "test": 200_000_001}
_ID_SPAN = 100_000_000
_MAX_ID_GAP = 7


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to (re)build one clip and its rows; ``label`` is the ground truth."""

    split: str
    index: int
    label: str
    duration_s: float
    sample_rate: int
    channels: int
    fmt: str
    level: float
    youtube_id: str
    start_time: int
    captions: tuple[str, ...]
    audiocap_ids: tuple[int, ...]
    audio_seed: int

    @property
    def path(self) -> str:
        """File name stored in ``audio.path``, AudioCaps style: ``Y<youtube_id>_<start>.<ext>``."""
        return f"Y{self.youtube_id}_{self.start_time}.{self.fmt}"

    @property
    def frames(self) -> int:
        """Number of sample frames of the rendered clip."""
        return int(round(self.duration_s * self.sample_rate))

    @property
    def events(self) -> tuple[str, ...]:
        """Event classes in time order."""
        return split_label(self.label)

    def render(self) -> np.ndarray:
        """The clip's float32 samples, ``(frames, channels)`` (deterministic)."""
        rng = np.random.default_rng(self.audio_seed)
        return generate_clip(rng, self.label, self.duration_s, self.sample_rate, self.channels, level=self.level)

    def encode(self) -> bytes:
        """The clip as an encoded audio file in ``fmt`` (deterministic)."""
        return encode_audio(self.render(), self.sample_rate, self.fmt)


def _youtube_id(seed: int, split: str, index: int, attempt: int = 0) -> str:
    """Deterministic 11-character YouTube-style id (``[A-Za-z0-9_-]``)."""
    key = f"af3dist-synthetic-audiocaps/{seed}/{split}/{index}/{attempt}".encode()
    digest = hashlib.blake2b(key, digest_size=9).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")[:11]


def _combo(index: int) -> tuple[str, int, int]:
    """(format, rate, channels) for clip ``index``.

    Any 4 consecutive clips cover all formats, any 4 aligned clips all rates, any 2 aligned
    both channel layouts, and each aligned block of 32 clips every one of the 32
    combinations (so coverage does not depend on luck).
    """
    fmt = FORMATS[index % 4]
    rate = SAMPLE_RATES[(index // 4 + index) % 4]
    channels = CHANNELS[(index // 16 + index) % 2]
    return fmt, rate, channels


def _long_positions(n_clips: int, long_clips: int) -> set[int]:
    """Evenly spread clip indices that get a >30 s duration."""
    k = max(0, min(long_clips, n_clips))
    return {int((j + 0.5) * n_clips / k) for j in range(k)}


def plan_clips(split: str, n_clips: int, seed: int = 0, *, long_clips: int = 1, fmt: str | None = None,
               sample_rate: int | None = None, channels: int | None = None,
               duration_s: float | None = None) -> list[ClipSpec]:
    """Deterministic per-clip specs for one split (no audio is synthesised here).

    Every third clip is an "X followed by Y" sequence, the others cycle through
    :data:`SOUND_CLASSES`; format/rate/channels cycle via :func:`_combo`; durations
    are uniform in 1-10 s except ``long_clips`` evenly spaced clips of 31-40 s.
    Train clips get one caption, validation/test clips five distinct ones.  The plan
    of a split depends only on ``(split, n_clips, seed, long_clips)`` and the fixed values: ``fmt``,
    ``sample_rate``, ``channels`` or ``duration_s``, when given, replace the cycled or drawn value of every
    clip (labels, levels, captions and ids stay those of the default plan).
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if split not in _SPLIT_INDEX:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n_clips < 0:
        raise ValueError("n_clips must be >= 0")
    refs = 1 if split == "train" else REFS_PER_EVAL_CLIP
    if n_clips * refs * _MAX_ID_GAP >= _ID_SPAN:
        raise ValueError(f"too many clips for split {split!r}")
    split_idx = _SPLIT_INDEX[split]
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_idx, 0xAC]))
    audio_seeds = np.random.SeedSequence([seed, split_idx, 0xA0D10]).generate_state(max(n_clips, 1), np.uint64)

    pairs = all_labels()[len(SOUND_CLASSES) :]
    pair_order = [pairs[i] for i in rng.permutation(len(pairs))]
    class_offset = 3 * split_idx
    long_at = _long_positions(n_clips, long_clips)

    next_id = _ID_BASE[split]
    specs: list[ClipSpec] = []
    singles = sequences = 0
    for i in range(n_clips):
        if i % _SEQUENCE_EVERY == _SEQUENCE_EVERY - 1:
            label = pair_order[sequences % len(pair_order)]
            sequences += 1
        else:
            label = SOUND_CLASSES[(singles + class_offset) % len(SOUND_CLASSES)]
            singles += 1
        clip_fmt, rate, layout = _combo(i)
        lo, hi = LONG_DURATION_S if i in long_at else SHORT_DURATION_S
        duration = round(float(rng.uniform(lo, hi)), 3)  # drawn even when fixed: the rest of the plan is unchanged
        level = round(float(rng.uniform(*LEVEL_RANGE)), 4)
        start_time = int(rng.integers(0, 600))
        texts = captions_for(label)
        picks = rng.choice(len(texts), size=refs, replace=False)
        captions = tuple(texts[int(p)] for p in picks)
        ids = []
        for _ in range(refs):
            ids.append(next_id)
            next_id += int(rng.integers(1, _MAX_ID_GAP + 1))
        specs.append(
            ClipSpec(
                split=split,
                index=i,
                label=label,
                duration_s=duration if duration_s is None else float(duration_s),
                sample_rate=rate if sample_rate is None else int(sample_rate),
                channels=layout if channels is None else int(channels),
                fmt=clip_fmt if fmt is None else fmt,
                level=level,
                youtube_id=_youtube_id(seed, split, i),
                start_time=start_time,
                captions=captions,
                audiocap_ids=tuple(ids),
                audio_seed=int(audio_seeds[i]),
            )
        )
    return specs

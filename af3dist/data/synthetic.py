"""Synthetic, offline stand-in for the Hugging Face dataset ``OpenSound/AudioCaps``.

The real data pipeline (parquet shards -> decode -> resample -> log-mel ->
captions) has to be testable without network access or the 50k-clip corpus.
This module writes a small dataset with *exactly* the on-disk layout of
``OpenSound/AudioCaps``::

    OUT/data/train-00000-of-00002.parquet
    OUT/data/validation-00000-of-00002.parquet
    OUT/data/test-00000-of-00002.parquet
    ...

with the columns (in this order) ``audio`` (``struct<bytes: binary, path:
string>`` holding a whole encoded audio file), ``caption`` (string),
``audiocap_id`` (int64, unique per row), ``youtube_id`` (string, 11 chars) and
``start_time`` (int64 seconds).  Train has one caption per clip; validation and
test have five rows (five distinct reference captions) per clip, sharing the
audio bytes, ``youtube_id`` and ``start_time`` -- just like AudioCaps.

The audio is procedurally generated sound events (tones, chirps, coloured
noise, beeps, buzzing, clicks, and "X followed by Y" sequences) that are
acoustically very distinct, so that a *tiny* model trained on log-mel features
can actually learn to caption them; this makes end-to-end smoke tests of the
training loop meaningful (loss must go down, captions must match).

Clips deliberately cycle through every container/codec (WAV, FLAC, MP3,
OGG/Vorbis), sample rate (16, 22.05, 44.1, 48 kHz), mono/stereo, 1-10 s
durations and a few clips longer than 30 s, so the loader's decode/resample/
downmix/crop paths all get exercised.

Everything is deterministic from the seed: two runs with the same arguments
give byte-identical parquet files.  (libsndfile's Ogg muxer picks a random
stream serial number on every call; :func:`encode_audio` rewrites it to a
content-derived value and recomputes the page checksums, see
:func:`_normalize_ogg_serial`.  WAV, FLAC and MP3 (LAME) output is already
deterministic.)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import struct
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from af3dist.fsutil import building_file

__all__ = [
    "SOUND_CLASSES",
    "SPLITS",
    "FORMATS",
    "SAMPLE_RATES",
    "CHANNELS",
    "REFS_PER_EVAL_CLIP",
    "AUDIOCAPS_SCHEMA",
    "ClipSpec",
    "sequence_label",
    "split_label",
    "all_labels",
    "captions_for",
    "caption_corpus",
    "label_for_caption",
    "generate_clip",
    "encode_audio",
    "plan_clips",
    "shard_file_name",
    "make_synthetic_audiocaps",
]

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Split names, in the order AudioCaps uses them."""

FORMATS: tuple[str, ...] = ("wav", "flac", "mp3", "ogg")
"""Audio container formats the generator cycles through (also the file extensions)."""

SAMPLE_RATES: tuple[int, ...] = (16000, 22050, 44100, 48000)
"""Sample rates the generator cycles through."""

CHANNELS: tuple[int, ...] = (1, 2)
"""Channel counts the generator cycles through (mono, stereo)."""

REFS_PER_EVAL_CLIP = 5
"""Reference captions (= rows) per clip in validation/test, as in AudioCaps."""

SEQUENCE_SEPARATOR = "+"
"""Joins the two event classes of a sequence label, e.g. ``"high_tone+white_noise"``."""

SHORT_DURATION_S = (1.0, 10.0)
LONG_DURATION_S = (31.0, 40.0)
LEVEL_RANGE = (0.05, 0.9)
ROW_GROUP_SIZE = 32  # rows per parquet row group; several per shard so readers can stream.

# Fraction of clips that are two-event sequences: every third clip.
_SEQUENCE_EVERY = 3
_FADE_S = 0.01

_SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}
# audiocap_id ranges per split never overlap (ids grow by 1..7 per row).
_ID_BASE = {"train": 1, "validation": 100_000_001, "test": 200_000_001}
_ID_SPAN = 100_000_000
_MAX_ID_GAP = 7

_FORMAT_SUBTYPES: dict[str, tuple[str, str]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "ogg": ("OGG", "VORBIS"),
}

AUDIOCAPS_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("audio", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("caption", pa.string()),
        pa.field("audiocap_id", pa.int64()),
        pa.field("youtube_id", pa.string()),
        pa.field("start_time", pa.int64()),
    ],
    # Same feature metadata `datasets` writes, so `datasets.load_dataset("parquet", ...)`
    # decodes the `audio` column as an Audio feature, like the real hub dataset.
    metadata={
        b"huggingface": json.dumps(
            {
                "info": {
                    "features": {
                        "audio": {"_type": "Audio"},
                        "caption": {"dtype": "string", "_type": "Value"},
                        "audiocap_id": {"dtype": "int64", "_type": "Value"},
                        "youtube_id": {"dtype": "string", "_type": "Value"},
                        "start_time": {"dtype": "int64", "_type": "Value"},
                    }
                }
            }
        ).encode()
    },
)
"""Arrow schema of every shard (column order matters: it matches the hub dataset)."""

# ---------------------------------------------------------------------------
# Sound classes and captions
# ---------------------------------------------------------------------------

# class -> (full captions used for single-event clips, short noun phrases used to
# build sequence captions).  All texts are distinct across classes so a caption
# maps back to exactly one label.
_CLASS_TEXT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "low_tone": (
        (
            "A low steady tone hums",
            "A deep constant hum is heard",
            "A low-pitched tone drones steadily",
            "A steady low hum continues without change",
            "A low humming sound plays continuously",
            "A constant deep drone is heard",
        ),
        ("a low tone", "a deep hum", "a low steady hum", "a deep droning tone"),
    ),
    "high_tone": (
        (
            "A high-pitched tone rings steadily",
            "A shrill continuous tone sounds",
            "A high steady whine is heard",
            "A sharp high-pitched tone plays continuously",
            "A constant high tone rings out",
            "A piercing high tone sounds without stopping",
        ),
        ("a high tone", "a shrill whine", "a high-pitched tone", "a piercing tone"),
    ),
    "rising_chirp": (
        (
            "A tone sweeps upward in pitch",
            "A rising whistle climbs higher and higher",
            "A sound rises steadily in pitch",
            "A sweeping tone glides from low to high",
            "An upward pitch sweep is heard",
            "A whistling tone rises in pitch",
        ),
        ("a rising sweep", "an upward chirp", "a rising whistle", "a tone sweeping upward"),
    ),
    "white_noise": (
        (
            "White noise hisses steadily",
            "A loud static hiss is heard",
            "Constant hissing static plays",
            "A harsh steady hiss fills the air",
            "Static noise hisses continuously",
            "A bright hissing noise is heard",
        ),
        ("white noise", "a static hiss", "a harsh hiss", "loud static"),
    ),
    "pink_noise": (
        (
            "A soft steady rushing noise is heard",
            "Pink noise rushes steadily",
            "A smooth whooshing noise continues",
            "A gentle rushing sound like a waterfall plays",
            "A steady rushing noise similar to rain is heard",
            "A soft broadband rush continues steadily",
        ),
        ("pink noise", "a soft rushing noise", "a gentle whoosh", "a steady rush"),
    ),
    "brown_noise": (
        (
            "A deep rumbling noise is heard",
            "Low rumbling noise continues steadily",
            "Brown noise rumbles in a low roar",
            "A muffled roar rumbles constantly",
            "A deep low rumble like distant thunder continues",
            "A heavy rumbling roar is heard",
        ),
        ("a deep rumble", "brown noise", "a low roar", "a muffled rumble"),
    ),
    "beeps": (
        (
            "A series of short beeps is heard",
            "Electronic beeps repeat at a steady pace",
            "A device beeps repeatedly",
            "Short beeping sounds repeat several times",
            "Rapid beeps sound over and over",
            "A beeping alarm pulses regularly",
        ),
        ("repeated beeps", "a series of beeps", "short beeping", "rhythmic beeps"),
    ),
    "buzz": (
        (
            "A harsh electric buzzing is heard",
            "A loud buzzing drone continues",
            "Something buzzes steadily",
            "A coarse buzz hums on and on",
            "An electrical buzz sounds continuously",
            "A raspy buzzing noise is heard",
        ),
        ("a buzzing", "an electric buzz", "a harsh buzz", "a raspy drone"),
    ),
    "clicks": (
        (
            "Several clicks are heard in silence",
            "Sharp clicking sounds occur sporadically",
            "A few isolated clicks break the silence",
            "Quiet tapping clicks occur now and then",
            "Scattered clicks are heard against silence",
            "Occasional sharp ticks sound",
        ),
        ("a few clicks", "sporadic clicking", "sharp clicks", "scattered ticks"),
    ),
}

SOUND_CLASSES: list[str] = list(_CLASS_TEXT)
"""The single-event sound classes, in a fixed order.  Sequence labels combine two of them."""

# Templates for "X followed by Y" captions; {a}/{b} are the two classes' short phrases.
_SEQUENCE_TEMPLATES: tuple[str, ...] = (
    "{a} followed by {b}",
    "{a}, then {b}",
    "{a} and then {b}",
    "first {a}, then {b}",
    "{a} is followed by {b}",
    "{a} gives way to {b}",
    "{a} stops and {b} begins",
    "{a} ends as {b} starts",
)


def sequence_label(first: str, second: str) -> str:
    """Label of a two-event clip ("first followed by second"), e.g. ``"beeps+buzz"``."""
    for name in (first, second):
        if name not in _CLASS_TEXT:
            raise ValueError(f"unknown sound class {name!r}")
    if first == second:
        raise ValueError("a sequence needs two different classes")
    return f"{first}{SEQUENCE_SEPARATOR}{second}"


def split_label(label: str) -> tuple[str, ...]:
    """The event classes of a label in time order: ``("buzz",)`` or ``("beeps", "buzz")``."""
    parts = tuple(label.split(SEQUENCE_SEPARATOR))
    if not 1 <= len(parts) <= 2 or any(p not in _CLASS_TEXT for p in parts):
        raise ValueError(f"unknown label {label!r}")
    if len(parts) == 2 and parts[0] == parts[1]:
        raise ValueError(f"unknown label {label!r}")
    return parts


def all_labels() -> list[str]:
    """Every label the generator can emit: the single classes, then all ordered pairs."""
    pairs = [sequence_label(a, b) for a in SOUND_CLASSES for b in SOUND_CLASSES if a != b]
    return list(SOUND_CLASSES) + pairs


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _build_captions() -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, (full, _short) in _CLASS_TEXT.items():
        table[name] = tuple(full)
    for label in all_labels()[len(SOUND_CLASSES) :]:
        a, b = split_label(label)
        short_a, short_b = _CLASS_TEXT[a][1], _CLASS_TEXT[b][1]
        table[label] = tuple(
            _capitalize(t.format(a=short_a[k % len(short_a)], b=short_b[(k + 1) % len(short_b)]))
            for k, t in enumerate(_SEQUENCE_TEMPLATES)
        )
    return table


_CAPTIONS = _build_captions()
_CAPTION_TO_LABEL: dict[str, str] = {}
for _label, _texts in _CAPTIONS.items():
    if len(set(_texts)) != len(_texts) or len(_texts) < 6:
        raise AssertionError(f"captions of {_label!r} must be >= 6 and distinct")
    for _text in _texts:
        if _text in _CAPTION_TO_LABEL:
            raise AssertionError(f"caption {_text!r} is shared by two labels")
        _CAPTION_TO_LABEL[_text] = _label


def captions_for(label: str) -> list[str]:
    """All caption paraphrases for ``label`` (a class name or a sequence label); >= 6, distinct."""
    split_label(label)  # validates
    return list(_CAPTIONS[label])


def caption_corpus() -> list[str]:
    """Every caption text the generator can emit (deterministic order), e.g. to fit a tokenizer."""
    return [text for label in all_labels() for text in _CAPTIONS[label]]


def label_for_caption(caption: str) -> str:
    """Recover the label of a generated caption (every caption belongs to exactly one label)."""
    try:
        return _CAPTION_TO_LABEL[caption]
    except KeyError:
        raise KeyError(f"not a synthetic AudioCaps caption: {caption!r}") from None


# ---------------------------------------------------------------------------
# Sound synthesis
# ---------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, value: float, rel: float = 0.1) -> float:
    """``value`` scaled by a random factor in [1-rel, 1+rel] (small per-clip variation)."""
    return float(value * rng.uniform(1.0 - rel, 1.0 + rel))


def _sine(rng: np.random.Generator, n: int, sr: int, freq: float) -> np.ndarray:
    t = np.arange(n) / sr
    return np.sin(2.0 * np.pi * freq * t + rng.uniform(0.0, 2.0 * np.pi))


def _low_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return _sine(rng, n, sr, _jitter(rng, 220.0))


def _high_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return _sine(rng, n, sr, _jitter(rng, 2000.0))


def _rising_chirp(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    # Exponential sweep ~300 Hz -> ~3 kHz over the event.
    f0, f1 = _jitter(rng, 300.0), _jitter(rng, 3000.0)
    dur = max(n / sr, 1.0 / sr)
    t = np.arange(n) / sr
    k = np.log(f1 / f0)
    phase = 2.0 * np.pi * f0 * dur / k * (np.exp(k * t / dur) - 1.0)
    return np.sin(phase)


def _white_noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return rng.standard_normal(n)


def _coloured_noise(rng: np.random.Generator, n: int, sr: int, exponent: float) -> np.ndarray:
    """Noise with amplitude spectrum ~ f**-exponent (0.5: pink, 1.0: brown), DC/<20 Hz removed."""
    m = _fast_fft_len(n)  # pocketfft is slow for lengths with large prime factors
    spec = np.fft.rfft(rng.standard_normal(m))
    freqs = np.fft.rfftfreq(m, d=1.0 / sr)
    gain = np.zeros_like(freqs)
    keep = freqs >= 20.0
    gain[keep] = freqs[keep] ** -exponent
    return np.fft.irfft(spec * gain, n=m)[:n]


def _fast_fft_len(n: int) -> int:
    """Smallest 2**a * 3**b * 5**c >= n."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def _pink_noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return _coloured_noise(rng, n, sr, _jitter(rng, 0.5))


def _brown_noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return _coloured_noise(rng, n, sr, _jitter(rng, 1.0))


def _beeps(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    # ~1 kHz tone gated on/off: ~0.1 s beeps every ~0.25 s, 5 ms ramps.
    freq = _jitter(rng, 1000.0)
    period = _jitter(rng, 0.25)
    on = 0.4 * period
    t = np.arange(n) / sr
    pos = np.mod(t + rng.uniform(0.0, 0.05), period)
    ramp = 0.005
    gate = np.clip(np.minimum(pos, on - pos) / ramp, 0.0, 1.0)
    return gate * np.sin(2.0 * np.pi * freq * t)


def _buzz(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    # Band-limited pulse train at ~150 Hz: equal-amplitude harmonics up to ~3 kHz and
    # nothing above -> a flat-topped harmonic stack, unlike any noise colour or tone.
    # Closed form (Dirichlet kernel) of sum_{k=1..K} cos(k*theta), so it costs O(n).
    f0 = _jitter(rng, 150.0)
    harmonics = max(1, int(min(3000.0, 0.45 * sr) // f0))
    theta = 2.0 * np.pi * (f0 * np.arange(n) / sr + rng.uniform())
    half = np.sin(0.5 * theta)
    near_pulse = np.abs(half) < 1e-6
    safe = np.where(near_pulse, 1.0, half)
    out = np.sin((harmonics + 0.5) * theta) / (2.0 * safe) - 0.5
    return np.where(near_pulse, float(harmonics), out)


def _clicks(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    # Sparse, sharp 2 ms decaying noise bursts in digital silence (~3 per second).
    out = np.zeros(n)
    burst = max(int(0.002 * sr), 4)
    count = max(1, int(round(_jitter(rng, 3.0, 0.3) * n / sr)))
    starts = rng.integers(0, max(n - burst, 1), size=count)
    envelope = np.exp(-np.arange(burst) / (burst / 4.0))
    for s in starts:
        seg = out[s : s + burst]
        seg += rng.uniform(0.5, 1.0) * envelope[: len(seg)] * rng.standard_normal(len(seg))
    return out


_GENERATORS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "low_tone": _low_tone,
    "high_tone": _high_tone,
    "rising_chirp": _rising_chirp,
    "white_noise": _white_noise,
    "pink_noise": _pink_noise,
    "brown_noise": _brown_noise,
    "beeps": _beeps,
    "buzz": _buzz,
    "clicks": _clicks,
}
assert list(_GENERATORS) == SOUND_CLASSES


def _event(rng: np.random.Generator, name: str, n: int, sr: int) -> np.ndarray:
    """One event of class ``name``, ``n`` samples, faded in/out, peak-normalised to 1."""
    if n <= 0:
        return np.zeros(0)
    x = _GENERATORS[name](rng, n, sr)
    fade = min(int(_FADE_S * sr), n // 2)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(fade) + 0.5) / fade)
        x[:fade] *= ramp
        x[n - fade :] *= ramp[::-1]
    peak = float(np.max(np.abs(x)))
    return x / peak if peak > 0 else x


def generate_clip(
    rng: np.random.Generator,
    label: str,
    duration_s: float,
    sr: int,
    channels: int,
    *,
    level: float | None = None,
) -> np.ndarray:
    """Synthesize one clip of ``label`` as float32 samples of shape ``(frames, channels)``.

    ``frames = round(duration_s * sr)``.  A sequence label ``"a+b"`` puts class ``a``
    in the first half and ``b`` in the second.  The clip peaks at ``level`` (drawn
    uniformly from :data:`LEVEL_RANGE` when None); stereo channels are the same
    signal with two different gains (the louder one at gain 1).  All randomness
    (pitch +-10 %, phases, noise, click positions) comes from ``rng``.
    """
    events = split_label(label)
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    n = int(round(duration_s * sr))
    if n <= 0:
        raise ValueError(f"duration {duration_s} s at {sr} Hz gives no samples")
    if level is None:
        level = float(rng.uniform(*LEVEL_RANGE))
    if len(events) == 1:
        mono = _event(rng, events[0], n, sr)
    else:
        half = n // 2
        mono = np.concatenate([_event(rng, events[0], half, sr), _event(rng, events[1], n - half, sr)])
    mono *= level
    if channels == 1:
        gains = np.ones(1)
    else:
        gains = rng.permutation(np.array([1.0, rng.uniform(0.6, 0.9)]))
    return (mono[:, None] * gains[None, :]).astype(np.float32)


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------

_BITREV8 = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _ogg_crc(page: bytes) -> int:
    """Ogg page CRC-32 (poly 0x04C11DB7, MSB-first, init 0, no final xor), via zlib.

    zlib's CRC-32 is the bit-reflected form of the same polynomial, so feeding it
    bit-reversed bytes with a zero internal register yields the bit-reversed Ogg CRC.
    """
    raw = zlib.crc32(page.translate(_BITREV8), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{raw:032b}"[::-1], 2)


def _ogg_pages(data: bytes) -> list[tuple[int, int]]:
    """(start, end) byte offsets of every page in an Ogg stream."""
    pages = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] != b"OggS" or pos + 27 > len(data):
            raise ValueError(f"malformed Ogg stream at byte {pos}")
        nseg = data[pos + 26]
        end = pos + 27 + nseg + sum(data[pos + 27 : pos + 27 + nseg])
        if end > len(data):
            raise ValueError("truncated Ogg page")
        pages.append((pos, end))
        pos = end
    return pages


def _normalize_ogg_serial(data: bytes, serial: int | None = None) -> bytes:
    """Rewrite the stream serial number of every Ogg page and fix the page CRCs.

    libsndfile seeds each new Ogg stream with a random serial, the only
    non-deterministic bytes in its Vorbis output.  With ``serial=None`` the serial
    is derived from the content (CRC-32 of the stream with serials and CRCs
    zeroed), so identical audio always encodes to identical bytes.
    """
    buf = bytearray(data)
    pages = _ogg_pages(data)
    for start, _end in pages:
        buf[start + 14 : start + 18] = b"\0\0\0\0"
        buf[start + 22 : start + 26] = b"\0\0\0\0"
    if serial is None:
        serial = zlib.crc32(bytes(buf))
    packed = struct.pack("<I", serial & 0xFFFFFFFF)
    for start, end in pages:
        buf[start + 14 : start + 18] = packed
        buf[start + 22 : start + 26] = struct.pack("<I", _ogg_crc(bytes(buf[start:end])))
    return bytes(buf)


def encode_audio(samples: np.ndarray, sr: int, fmt: str) -> bytes:
    """Encode float samples (``(frames,)`` or ``(frames, channels)``, in [-1, 1]) as a whole file.

    ``fmt`` is one of :data:`FORMATS`: WAV/FLAC as 16-bit PCM, MP3 (LAME, MPEG layer
    III) and OGG/Vorbis.  Output is deterministic (the Ogg serial is normalised).
    """
    try:
        container, subtype = _FORMAT_SUBTYPES[fmt]
    except KeyError:
        raise ValueError(f"unsupported format {fmt!r}; expected one of {FORMATS}") from None
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), sr, format=container, subtype=subtype)
    data = buf.getvalue()
    if fmt == "ogg":
        data = _normalize_ogg_serial(data)
    return data


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------


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


def plan_clips(split: str, n_clips: int, seed: int = 0, *, long_clips: int = 1) -> list[ClipSpec]:
    """Deterministic per-clip specs for one split (no audio is synthesised here).

    Every third clip is an "X followed by Y" sequence, the others cycle through
    :data:`SOUND_CLASSES`; format/rate/channels cycle via :func:`_combo`; durations
    are uniform in 1-10 s except ``long_clips`` evenly spaced clips of 31-40 s.
    Train clips get one caption, validation/test clips five distinct ones.  The plan
    of a split depends only on ``(split, n_clips, seed, long_clips)``.
    """
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
        fmt, rate, channels = _combo(i)
        lo, hi = LONG_DURATION_S if i in long_at else SHORT_DURATION_S
        duration = round(float(rng.uniform(lo, hi)), 3)
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
                duration_s=duration,
                sample_rate=rate,
                channels=channels,
                fmt=fmt,
                level=level,
                youtube_id=_youtube_id(seed, split, i),
                start_time=start_time,
                captions=captions,
                audiocap_ids=tuple(ids),
                audio_seed=int(audio_seeds[i]),
            )
        )
    return specs


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def shard_file_name(split: str, shard: int, num_shards: int) -> str:
    """Hub-style shard name, e.g. ``train-00000-of-00002.parquet``."""
    return f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"


_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-\d{5}-of-\d{5}\.parquet$")


def _clip_table(specs: Sequence[ClipSpec]) -> pa.Table:
    """Rows of ``specs`` (one per caption) as a table with :data:`AUDIOCAPS_SCHEMA`."""
    audio, captions, ids, yids, starts = [], [], [], [], []
    for spec in specs:
        payload = {"bytes": spec.encode(), "path": spec.path}
        for caption, cap_id in zip(spec.captions, spec.audiocap_ids):
            audio.append(payload)
            captions.append(caption)
            ids.append(cap_id)
            yids.append(spec.youtube_id)
            starts.append(spec.start_time)
    columns = {"audio": audio, "caption": captions, "audiocap_id": ids, "youtube_id": yids, "start_time": starts}
    return pa.Table.from_pydict(columns, schema=AUDIOCAPS_SCHEMA)


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` via a temp file in the same directory + ``os.replace``."""
    with building_file(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="snappy")


def _resolve_long_clips(long_clips: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(long_clips, Mapping):
        unknown = set(long_clips) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown splits in long_clips: {sorted(unknown)}")
        return {s: int(long_clips.get(s, 1)) for s in SPLITS}
    return {s: int(long_clips) for s in SPLITS}


def make_synthetic_audiocaps(
    out_dir: str | os.PathLike[str],
    *,
    train_clips: int = 256,
    validation_clips: int = 24,
    test_clips: int = 24,
    shards: int = 2,
    long_clips: int | Mapping[str, int] = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a synthetic AudioCaps (OpenSound/AudioCaps layout) under ``out_dir/data``.

    ``shards`` is the number of parquet files per split (fewer when a split has
    fewer clips; a split with 0 clips gets one empty shard).  A clip's rows never
    straddle shards.  ``long_clips`` (an int for every split, or a per-split
    mapping) is the number of >30 s clips per split.  Stale shards of an earlier
    run with a different shard count are removed.  Fully deterministic from the
    arguments.

    Returns a summary: ``{"out_dir", "data_dir", "seed", "files": [paths],
    "splits": {split: {"clips", "rows", "files", "formats", "sample_rates",
    "channels", "long_clips", "sequence_clips", "audio_seconds"}}, "formats",
    "sample_rates", "channels"}`` (counts are per clip).
    """
    if shards < 1:
        raise ValueError("shards must be >= 1")
    counts = {"train": train_clips, "validation": validation_clips, "test": test_clips}
    longs = _resolve_long_clips(long_clips)
    plans = {s: plan_clips(s, counts[s], seed, long_clips=longs[s]) for s in SPLITS}

    seen: set[str] = set()
    for specs in plans.values():
        for spec in specs:
            if spec.youtube_id in seen:  # 66-bit hashes: never expected to happen
                raise RuntimeError(f"youtube_id collision: {spec.youtube_id}")
            seen.add(spec.youtube_id)

    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "out_dir": str(Path(out_dir)),
        "data_dir": str(data_dir),
        "seed": seed,
        "files": [],
        "splits": {},
    }
    totals: dict[str, Counter] = {"formats": Counter(), "sample_rates": Counter(), "channels": Counter()}
    for split in SPLITS:
        specs = plans[split]
        n_shards = max(1, min(shards, len(specs)))
        bounds = np.linspace(0, len(specs), n_shards + 1).round().astype(int)
        files, rows = [], 0
        for k in range(n_shards):
            table = _clip_table(specs[bounds[k] : bounds[k + 1]])
            path = data_dir / shard_file_name(split, k, n_shards)
            _write_atomic(table, path)
            rows += table.num_rows
            files.append(str(path))
        keep = {Path(f).name for f in files}
        for old in sorted(data_dir.iterdir()):
            m = _SHARD_RE.match(old.name)
            if m and m.group("split") == split and old.name not in keep:
                old.unlink()
        per = {
            "formats": Counter(s.fmt for s in specs),
            "sample_rates": Counter(s.sample_rate for s in specs),
            "channels": Counter(s.channels for s in specs),
        }
        for key, counter in per.items():
            totals[key].update(counter)
        summary["splits"][split] = {
            "clips": len(specs),
            "rows": rows,
            "files": files,
            **{key: dict(sorted(c.items())) for key, c in per.items()},
            "long_clips": sum(s.duration_s > 30.0 for s in specs),
            "sequence_clips": sum(len(s.events) == 2 for s in specs),
            "audio_seconds": round(sum(s.duration_s for s in specs), 3),
        }
        summary["files"].extend(files)
    for key, counter in totals.items():
        summary[key] = dict(sorted(counter.items()))
    return summary

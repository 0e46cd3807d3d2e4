"""Decode encoded audio bytes to 16 kHz mono float32, and say precisely why when that is impossible.

libsndfile (through soundfile) reads WAV, FLAC, OGG/Vorbis and MP3 with no FFmpeg; soxr resamples.
Every failure is a `ClipError` with a short machine-readable `reason`, so a pipeline can drop the
row, count it and go on.
"""

from __future__ import annotations

import io
import struct

import fsspec
import numpy as np
import soundfile as sf
import soxr

TARGET_SAMPLING_RATE = 16000

# Why a clip was rejected; the keys of every error count and errors file.
REASONS = ("missing_audio", "unsupported_codec", "corrupt", "empty_audio", "non_finite", "too_long",
           "empty_caption", "unreadable")

# A file whose header the decoder understands but that yields fewer frames than the header declares
# (beyond encoder slack) was cut short.
_TRUNCATION_SLACK_FRAMES = 4096


class ClipError(ValueError):
    """A clip that cannot become model input; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def sniff_format(data: bytes) -> str | None:
    """The container named by the file's magic bytes, or None when it is none we can decode."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def _wav_declared_bytes(data: bytes) -> tuple[int, int] | None:
    """(declared, present) size of a WAV `data` chunk, or None when the header has no usable size."""
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk_id == b"data":
            if size in (0, 0xFFFFFFFF):  # streamed WAV: size unknown
                return None
            return size, len(data) - pos - 8
        pos += 8 + size + (size & 1)
    return None


def decode_audio(data: bytes | None) -> tuple[np.ndarray, int]:
    """Encoded bytes -> (float32 array of shape (frames, channels), sampling rate)."""
    if not data:
        raise ClipError("missing_audio", "no audio bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise ClipError("unsupported_codec", f"unrecognised container (magic {data[:12]!r})")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            declared, sr = f.frames, f.samplerate
            samples = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise ClipError("corrupt", f"{fmt} could not be decoded ({str(e).split(':')[-1].strip()})") from None
    if fmt == "wav":
        sizes = _wav_declared_bytes(data)
        if sizes and sizes[1] < sizes[0]:
            raise ClipError("corrupt", f"truncated wav: {sizes[1]} of {sizes[0]} data bytes present")
    if 0 < declared and len(samples) + _TRUNCATION_SLACK_FRAMES < declared:
        raise ClipError("corrupt", f"truncated {fmt}: decoded {len(samples)} of {declared} frames")
    if declared == 0 and len(samples) == 0 and fmt == "ogg" and len(data) > 4096:
        raise ClipError("corrupt", "truncated ogg: no complete page of audio")
    return samples, sr


def to_mono_16k(samples: np.ndarray, sampling_rate: int, quality: str = "HQ") -> np.ndarray:
    """Average the channels and resample to 16 kHz with soxr (band-limited, no aliasing)."""
    if samples.ndim == 2:
        # a matrix-vector product: the same average as mean(axis=1), ~70x faster on (frames, 2) arrays
        mono = samples.astype(np.float32, copy=False) @ np.full(samples.shape[1], 1.0 / samples.shape[1], np.float32)
    else:
        mono = samples.astype(np.float32)
    if sampling_rate != TARGET_SAMPLING_RATE and len(mono):
        mono = soxr.resample(mono, sampling_rate, TARGET_SAMPLING_RATE, quality=quality)
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_waveform(data: bytes | None, *, max_seconds: float | None = None, quality: str = "HQ") -> np.ndarray:
    """Bytes -> validated 16 kHz mono float32 waveform, or a ClipError saying why not."""
    samples, sr = decode_audio(data)
    if samples.shape[0] == 0:
        raise ClipError("empty_audio", "the file holds no samples")
    seconds = samples.shape[0] / sr
    if max_seconds is not None and seconds > max_seconds:
        raise ClipError("too_long", f"{seconds:.1f} s is over the {max_seconds:g} s limit")
    if not np.isfinite(samples).all():
        raise ClipError("non_finite", "NaN or infinite samples")
    return to_mono_16k(samples, sr, quality)


def waveform_from_array(samples: np.ndarray, sampling_rate: int, quality: str = "HQ") -> np.ndarray:
    """Arrays handed in directly (any rate, mono (frames,) or (frames, channels)) -> 16 kHz mono."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.size == 0:
        raise ClipError("empty_audio", "the array holds no samples")
    if not np.isfinite(samples).all():
        raise ClipError("non_finite", "NaN or infinite samples")
    return to_mono_16k(samples, sampling_rate, quality)


_FILESYSTEMS: dict[str, fsspec.AbstractFileSystem] = {}


def read_audio_file(location: str, max_bytes: int) -> bytes:
    """The bytes of an audio file at a local path or any fsspec URL; ClipError (missing_audio, too_long,
    unreadable) when there is no path, the file is over `max_bytes`, or it cannot be read."""
    if not location:
        raise ClipError("missing_audio", "no path given")
    protocol = location.split("://", 1)[0] if "://" in location else "file"
    fs = _FILESYSTEMS.get(protocol)
    if fs is None:
        fs = _FILESYSTEMS[protocol] = fsspec.core.url_to_fs(location)[0]
    try:
        with fs.open(location, "rb") as f:
            size = getattr(f, "size", None)
            if size is not None and size > max_bytes:
                raise ClipError("too_long", f"the file is {size / 2**20:.0f} MB, over the "
                                            f"{max_bytes / 2**20:.0f} MB limit")
            return f.read()
    except ClipError:
        raise
    except Exception as e:  # missing, permission, dangling link, a folder, network: one reason
        raise ClipError("unreadable", f"{type(e).__name__}: {e}") from None

"""Encode audio with FFmpeg (PyAV) in the containers and codecs people record in.

Tests and benchmarks use it to make files that our own writer (libsndfile, `synthetic.encode_audio`) did
not make: AAC in M4A as phones save it, Opus in WebM as browsers do, AIFF as editors do, MP3 with ID3 tags
as the web has it. `id3_tag` builds ID3v2.2/2.3/2.4 tags (text frames, an embedded picture, padding) to
put in front of an MP3, and `ID3V1_TAG` is the 128-byte tag some players append.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np

# name -> (FFmpeg muxer, encoder, sample format the encoder takes or None for its first, codec options)
FORMATS: dict[str, tuple[str, str, str | None, dict[str, str]]] = {
    "wav_u8": ("wav", "pcm_u8", None, {}),
    "wav_s16": ("wav", "pcm_s16le", None, {}),
    "wav_s24": ("wav", "pcm_s24le", None, {}),
    "wav_s32": ("wav", "pcm_s32le", None, {}),
    "wav_f32": ("wav", "pcm_f32le", None, {}),
    "w64": ("w64", "pcm_s16le", None, {}),
    "flac_s16": ("flac", "flac", "s16", {}),
    "flac_s24": ("flac", "flac", "s32", {"bits_per_raw_sample": "24"}),
    "mp3": ("mp3", "libmp3lame", None, {}),
    "ogg_vorbis": ("ogg", "vorbis", None, {"strict": "experimental"}),
    "ogg_opus": ("ogg", "libopus", None, {}),
    "webm_opus": ("webm", "libopus", None, {}),
    "webm_vorbis": ("webm", "vorbis", None, {"strict": "experimental"}),
    "mka_vorbis": ("matroska", "vorbis", None, {"strict": "experimental"}),
    "m4a_aac": ("ipod", "aac", None, {}),
    "m4a_alac": ("ipod", "alac", None, {}),
    "mp4_aac": ("mp4", "aac", None, {}),
    "aac_adts": ("adts", "aac", None, {}),
    "aiff_s16": ("aiff", "pcm_s16be", None, {}),
    "aiff_s24": ("aiff", "pcm_s24be", None, {}),
    "caf": ("caf", "pcm_s16le", None, {}),
    "au": ("au", "pcm_s16be", None, {}),
    "ac3": ("ac3", "ac3", None, {}),
    "wavpack": ("wv", "wavpack", None, {}),
    "mp2": ("mp2", "mp2", None, {}),
}
# Codecs that take only some rates (Opus: 8/12/16/24/48 kHz; AC-3: 32/44.1/48 kHz).
RATES = {"libopus": (8000, 12000, 16000, 24000, 48000), "ac3": (32000, 44100, 48000), "mp2": (32000, 44100, 48000)}
LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}


def encode(samples: np.ndarray, sampling_rate: int, fmt: str, *, container_options: dict | None = None) -> bytes:
    """float32 samples of shape (frames,) or (frames, channels) -> the bytes of a `fmt` file (a FORMATS key)."""
    muxer, codec, sample_fmt, codec_options = FORMATS[fmt]
    x = np.asarray(samples, dtype=np.float32)
    x = x[:, None] if x.ndim == 1 else x
    layout = LAYOUTS[x.shape[1]]
    buf = io.BytesIO()
    with av.open(buf, "w", format=muxer, container_options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=sampling_rate, options=dict(codec_options))
        stream.layout = layout
        if sample_fmt:
            stream.format = sample_fmt
        # packed (one plane): PyAV miscounts the planes of planar frames with more than 8 channels
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x).reshape(1, -1), format="flt", layout=layout)
        frame.sample_rate = sampling_rate
        resampler = av.AudioResampler(format=stream.format.name, layout=layout, rate=sampling_rate)
        for converted in [*resampler.resample(frame), *resampler.resample(None)]:
            out.mux(stream.encode(converted))
        out.mux(stream.encode(None))
    return buf.getvalue()


def _syncsafe(n: int) -> bytes:
    return bytes(((n >> shift) & 0x7F) for shift in (21, 14, 7, 0))


def id3_tag(version: int, *, title: str = "A recording", picture: bytes | None = None, padding: int = 0,
            raw_text: bytes | None = None) -> bytes:
    """An ID3v2.`version` tag (2, 3 or 4): a title, optionally an embedded picture and zero padding.
    `raw_text` is put in a comment frame as is (say, bytes that are not valid in its declared encoding)."""
    frames = []

    def frame(v3_id: str, v2_id: str, body: bytes) -> bytes:
        if version == 2:
            return v2_id.encode() + struct.pack(">I", len(body))[1:] + body
        size = _syncsafe(len(body)) if version == 4 else struct.pack(">I", len(body))
        return v3_id.encode() + size + b"\x00\x00" + body

    text_encoding = b"\x03" if version == 4 else b"\x01"  # UTF-8 (v2.4) or UTF-16 with BOM
    encoded = title.encode("utf-8") if version == 4 else title.encode("utf-16")
    frames.append(frame("TIT2", "TT2", text_encoding + encoded))
    if raw_text is not None:
        frames.append(frame("COMM", "COM", b"\x00eng\x00" + raw_text))
    if picture is not None:
        if version == 2:
            frames.append(frame("APIC", "PIC", b"\x00PNG\x03\x00" + picture))
        else:
            frames.append(frame("APIC", "PIC", b"\x00image/png\x00\x03\x00" + picture))
    body = b"".join(frames) + bytes(padding)
    return b"ID3" + bytes([version, 0, 0]) + _syncsafe(len(body)) + body


ID3V1_TAG = b"TAG" + b"A recording".ljust(30, b"\x00") + b"Someone".ljust(30, b"\x00") + bytes(30) + \
    b"2026" + bytes(28) + b"\x00\x01" + b"\x0c"

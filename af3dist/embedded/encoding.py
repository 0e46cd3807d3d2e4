"""Encoding synthetic clips as whole audio files (WAV, FLAC, MP3, Ogg Vorbis), byte-for-byte deterministic.

libsndfile's Ogg muxer picks a random stream serial number on every call; `encode_audio` rewrites it to a
content-derived value and recomputes the page checksums (`_normalize_ogg_serial`). WAV, FLAC and MP3 (LAME)
output is already deterministic.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import soundfile as sf

FORMATS: tuple[str, ...] = ("wav", "flac", "mp3", "ogg")
"""Audio container formats the generator cycles through (also the file extensions)."""

_FORMAT_SUBTYPES: dict[str, tuple[str, str]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "ogg": ("OGG", "VORBIS"),
}


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

import io

import numpy as np
import pytest
import soundfile as sf

from af3dist.data.audio import ClipError, load_waveform, sniff_format, waveform_from_array
from af3dist.embedded.encoding import encode_audio


def _tone(sr: int, seconds: float, channels: int, amp: float = 0.5, freq: float = 1000.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    # stereo: the right channel at half gain, so the downmix level is 0.75 of the left's
    return x[:, None] if channels == 1 else np.stack([x, 0.5 * x], axis=1)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
@pytest.mark.parametrize("sr", [16000, 22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_every_codec_rate_and_layout_decodes_to_16k_mono(fmt, sr, channels):
    data = encode_audio(_tone(sr, 2.0, channels), sr, fmt)
    assert sniff_format(data) == fmt
    wave = load_waveform(data)
    assert wave.dtype == np.float32 and wave.ndim == 1
    # lossy codecs: encoder priming and end trimming differ between encoders and decoders by a block
    assert abs(len(wave) - 32000) <= (1200 if fmt in ("mp3", "ogg") else 2), len(wave)
    expected_rms = 0.5 / np.sqrt(2) * (1.0 if channels == 1 else 0.75)
    core = wave[2000:-2000]
    assert np.sqrt(np.mean(core ** 2)) == pytest.approx(expected_rms, rel=0.06)
    spectrum = np.abs(np.fft.rfft(core))
    assert np.fft.rfftfreq(len(core), 1 / 16000)[spectrum.argmax()] == pytest.approx(1000, abs=5)


def test_resampling_removes_content_above_nyquist():
    # a 12 kHz tone at 48 kHz cannot exist at 16 kHz: a band-limited resampler removes it
    data = encode_audio(_tone(48000, 1.0, 1, freq=12000), 48000, "flac")
    assert np.sqrt(np.mean(load_waveform(data) ** 2)) < 0.01


def _wav(samples: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def _reason(data: bytes | None, **kw) -> str:
    with pytest.raises(ClipError) as err:
        load_waveform(data, **kw)
    return err.value.reason


def test_bad_audio_is_rejected_with_a_precise_reason():
    good = encode_audio(_tone(44100, 3.0, 2), 44100, "flac")
    assert _reason(None) == "missing_audio"
    assert _reason(b"") == "missing_audio"
    assert _reason(b"\x00\x00\x00\x20ftypM4A " + bytes(600)) == "corrupt"  # an M4A header, no audio
    assert _reason(b"\x89PNG\r\n\x1a\n" + bytes(600)) == "unsupported_codec"
    assert _reason(b"just some text, not audio at all") == "unsupported_codec"
    assert _reason(b"fLaC" + bytes(range(256)) * 8) == "corrupt"
    assert _reason(good[: len(good) // 2]) == "corrupt"  # truncated flac
    wav = _wav(_tone(16000, 3.0, 1))
    assert _reason(wav[: len(wav) // 2]) == "corrupt"  # truncated wav
    mp3 = encode_audio(_tone(48000, 3.0, 1), 48000, "mp3")
    assert _reason(mp3[: len(mp3) // 2]) == "corrupt"  # truncated mp3
    assert _reason(_wav(np.zeros((0, 1), dtype=np.float32))) == "empty_audio"
    nan = _tone(16000, 1.0, 1)
    nan[100:200] = np.nan
    assert _reason(_wav(nan, subtype="FLOAT")) == "non_finite"
    assert _reason(good, max_seconds=2.0) == "too_long"
    assert len(load_waveform(good, max_seconds=5.0)) == pytest.approx(48000, abs=2)


def test_arrays_at_any_rate():
    wave = waveform_from_array(_tone(8000, 1.0, 2)[:, :], 8000)
    assert len(wave) == 16000
    with pytest.raises(ClipError):
        waveform_from_array(np.zeros(0), 16000)

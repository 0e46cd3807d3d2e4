"""Procedural sound events (tones, chirps, coloured noise, beeps, buzzing, clicks) and whole clips of a label.

The classes are acoustically very distinct, so that a tiny model trained on log-mel features can learn to
caption them. All randomness comes from the caller's generator: the same seed gives the same samples.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from af3dist.embedded.captions import SOUND_CLASSES, split_label

LEVEL_RANGE = (0.05, 0.9)
_FADE_S = 0.01



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

"""Tests for the synthetic OpenSound/AudioCaps generator (af3dist.embedded)."""

from __future__ import annotations

import io
import json
import re
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from af3dist.embedded.audiocaps import AUDIOCAPS_SCHEMA, make_synthetic_audiocaps
from af3dist.embedded.captions import (SOUND_CLASSES, all_labels, caption_corpus, captions_for, label_for_caption,
                                       split_label)
from af3dist.embedded.encoding import FORMATS, _normalize_ogg_serial, encode_audio
from af3dist.embedded.plan import LONG_DURATION_S, SAMPLE_RATES, SHORT_DURATION_S, SPLITS, ClipSpec, plan_clips
from af3dist.embedded.sounds import generate_clip

SIZES = {"train_clips": 24, "validation_clips": 6, "test_clips": 6}
SPLIT_SIZES = {"train": 24, "validation": 6, "test": 6}
SHARD_RE = re.compile(r"^(train|validation|test)-(\d{5})-of-(\d{5})\.parquet$")
YTID_RE = re.compile(r"^[A-Za-z0-9_-]{11}$")
SF_FORMAT = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3", "ogg": "OGG"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("audiocaps")
    summary = make_synthetic_audiocaps(out, shards=2, seed=0, **SIZES)
    return out, summary


@pytest.fixture(scope="module")
def tables(dataset: tuple[Path, dict]) -> dict[str, list[dict]]:
    """Rows of every split, as python dicts (read once)."""
    out, _ = dataset
    rows: dict[str, list[dict]] = {}
    for split in SPLITS:
        files = sorted((out / "data").glob(f"{split}-*.parquet"))
        rows[split] = [r for f in files for r in pq.read_table(f).to_pylist()]
    return rows


@pytest.fixture(scope="module")
def specs_by_ytid() -> dict[str, ClipSpec]:
    return {
        s.youtube_id: s
        for split, n in SPLIT_SIZES.items()
        for s in plan_clips(split, n, 0, long_clips=1)
    }


# --------------------------------------------------------------------------- layout


def test_layout_and_file_names(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    names = sorted(p.name for p in (out / "data").iterdir())
    assert names == sorted(
        f"{split}-0000{k}-of-00002.parquet" for split in ("train", "validation", "test") for k in range(2)
    )
    assert all(SHARD_RE.match(n) for n in names)
    assert sorted(Path(f).name for f in summary["files"]) == names
    assert list(out.iterdir()) == [out / "data"]  # nothing else, no temp files left behind
    for split, n in SPLIT_SIZES.items():
        s = summary["splits"][split]
        assert s["clips"] == n
        assert s["rows"] == n * (1 if split == "train" else 5)
        assert len(s["files"]) == 2


def test_schema_and_column_order(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    for f in sorted((out / "data").glob("*.parquet")):
        schema = pq.read_schema(f)
        assert schema.names == ["audio", "caption", "audiocap_id", "youtube_id", "start_time"]
        assert schema.equals(AUDIOCAPS_SCHEMA, check_metadata=False)
        assert str(schema.field("audio").type) == "struct<bytes: binary, path: string>"
        assert str(schema.field("audiocap_id").type) == "int64"
        assert str(schema.field("start_time").type) == "int64"
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        assert features["audio"] == {"_type": "Audio"}


def test_shard_count_capped_and_stale_shards_removed(tmp_path: Path) -> None:
    s = make_synthetic_audiocaps(
        tmp_path, train_clips=3, validation_clips=1, test_clips=0, shards=4, long_clips=0
    )
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert names == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet",
        "validation-00000-of-00001.parquet",
    ]
    assert s["splits"]["test"]["rows"] == 0
    assert pq.read_table(tmp_path / "data" / "test-00000-of-00001.parquet").schema.names[0] == "audio"
    make_synthetic_audiocaps(tmp_path, train_clips=3, validation_clips=1, test_clips=0, shards=1, long_clips=0)
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert names == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]


# --------------------------------------------------------------------------- rows


def test_train_one_row_per_clip(tables: dict[str, list[dict]]) -> None:
    rows = tables["train"]
    assert len(rows) == SPLIT_SIZES["train"]
    assert len({(r["youtube_id"], r["start_time"]) for r in rows}) == len(rows)


@pytest.mark.parametrize("split", ["validation", "test"])
def test_eval_splits_have_five_distinct_references(tables: dict[str, list[dict]], split: str) -> None:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in tables[split]:
        groups[(r["youtube_id"], r["start_time"])].append(r)
    assert len(groups) == SPLIT_SIZES[split]
    for rows in groups.values():
        assert len(rows) == 5
        assert len({r["caption"] for r in rows}) == 5
        assert len({r["audio"]["bytes"] for r in rows}) == 1
        assert len({r["audio"]["path"] for r in rows}) == 1
        assert len({label_for_caption(r["caption"]) for r in rows}) == 1


def test_ids_unique_and_well_formed(tables: dict[str, list[dict]]) -> None:
    all_rows = [r for rows in tables.values() for r in rows]
    ids = [r["audiocap_id"] for r in all_rows]
    assert len(set(ids)) == len(ids)
    clips = {(r["youtube_id"], r["start_time"]) for r in all_rows}
    assert len(clips) == sum(SPLIT_SIZES.values())  # (youtube_id, start_time) unique per clip
    assert len({y for y, _ in clips}) == len(clips)
    for r in all_rows:
        assert YTID_RE.match(r["youtube_id"])
        assert isinstance(r["start_time"], int) and r["start_time"] >= 0
        ext = r["audio"]["path"].rsplit(".", 1)[1]
        assert r["audio"]["path"] == f"Y{r['youtube_id']}_{r['start_time']}.{ext}"
        assert ext in FORMATS


# --------------------------------------------------------------------------- audio


def test_audio_decodes_with_expected_properties_and_coverage(
    tables: dict[str, list[dict]], specs_by_ytid: dict[str, ClipSpec]
) -> None:
    seen_formats, seen_rates, seen_channels, long_seen = set(), set(), set(), 0
    for split, rows in tables.items():
        first = {}
        for r in rows:
            first.setdefault(r["youtube_id"], r)
        for ytid, r in first.items():
            spec = specs_by_ytid[ytid]
            assert spec.split == split
            assert label_for_caption(r["caption"]) == spec.label
            ext = r["audio"]["path"].rsplit(".", 1)[1]
            assert ext == spec.fmt
            data, sr = sf.read(io.BytesIO(r["audio"]["bytes"]), dtype="float32", always_2d=True)
            info = sf.info(io.BytesIO(r["audio"]["bytes"]))
            assert info.format == SF_FORMAT[ext]
            assert sr == spec.sample_rate
            assert data.shape[1] == spec.channels
            duration = data.shape[0] / sr
            # MP3 may carry encoder delay/padding; libsndfile trims it via the LAME tag,
            # but allow a frame or two of slack for it anyway.
            tol = 0.1 if ext != "mp3" else 0.15
            assert abs(duration - spec.duration_s) < tol, (ext, duration, spec.duration_s)
            # the lengths: 1-10 s, or a long clip of 31-40 s (over one 30 s window)
            assert any(lo - tol <= duration <= hi + tol for lo, hi in (SHORT_DURATION_S, LONG_DURATION_S))
            peak = float(np.abs(data).max())
            assert 0.02 < peak < 1.0
            seen_formats.add(ext)
            seen_rates.add(sr)
            seen_channels.add(data.shape[1])
            long_seen += duration > 30.0
    assert seen_formats == set(FORMATS)
    assert seen_rates == set(SAMPLE_RATES)
    assert seen_channels == {1, 2}
    assert long_seen == 3  # long_clips=1 per split


def test_plan_covers_all_combinations() -> None:
    specs = plan_clips("train", 32, seed=3)
    assert len({(s.fmt, s.sample_rate, s.channels) for s in specs}) == 32
    assert sum(s.duration_s > 30 for s in specs) == 1
    assert all(1.0 <= s.duration_s <= 10.0 for s in specs if s.duration_s <= 30)
    assert all(0.05 <= s.level <= 0.9 for s in specs)
    assert {s.label for s in specs} >= set(SOUND_CLASSES)
    assert any(len(split_label(s.label)) == 2 for s in specs)
    for s in plan_clips("validation", 4, seed=3):
        assert len(s.captions) == 5 and len(set(s.captions)) == 5


def test_stereo_channels_differ_and_level_respected() -> None:
    rng = np.random.default_rng(1)
    x = generate_clip(rng, "white_noise", 1.0, 16000, 2, level=0.5)
    assert x.dtype == np.float32 and x.shape == (16000, 2)
    assert abs(float(np.abs(x).max()) - 0.5) < 1e-6
    assert not np.allclose(x[:, 0], x[:, 1])
    assert np.corrcoef(x[:, 0], x[:, 1])[0, 1] > 0.99  # same event, different gains
    m = generate_clip(rng, "low_tone", 2.5, 22050, 1)
    assert m.shape == (55125, 1)
    assert 0.05 <= float(np.abs(m).max()) <= 0.9


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_audio_roundtrip(fmt: str) -> None:
    x = generate_clip(np.random.default_rng(0), "low_tone", 1.3, 22050, 2, level=0.6)
    data = encode_audio(x, 22050, fmt)
    assert data == encode_audio(x, 22050, fmt)  # deterministic, including Ogg serials
    y, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert sr == 22050 and y.shape[1] == 2
    assert abs(y.shape[0] - x.shape[0]) / sr < 0.1
    n = min(len(x), len(y))
    # Lossy codecs: just require the waveform to be recognisably the same.
    assert np.corrcoef(x[:n, 0], y[:n, 0])[0, 1] > 0.9
    with pytest.raises(ValueError):
        encode_audio(x, 22050, "aac")


def test_ogg_serial_rewrite_preserves_valid_crcs() -> None:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((4000, 1), np.float32), 16000, format="OGG", subtype="VORBIS")
    raw = buf.getvalue()
    serial = struct.unpack("<I", raw[14:18])[0]
    # Rewriting with the original serial must reproduce libsndfile's own page CRCs.
    assert _normalize_ogg_serial(raw, serial) == raw
    norm = _normalize_ogg_serial(raw)
    assert sf.read(io.BytesIO(norm))[0].shape[0] == 4000


# --------------------------------------------------------------------------- determinism


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "data").iterdir())}


def test_deterministic_given_seed(tmp_path: Path) -> None:
    kw = dict(train_clips=8, validation_clips=2, test_clips=2, shards=2, long_clips=0)
    make_synthetic_audiocaps(tmp_path / "a", seed=7, **kw)
    make_synthetic_audiocaps(tmp_path / "b", seed=7, **kw)
    make_synthetic_audiocaps(tmp_path / "c", seed=8, **kw)
    a, b, c = (_file_bytes(tmp_path / d) for d in "abc")
    assert a == b  # byte-identical parquet files
    assert a.keys() == c.keys()
    for name in a:
        ta = pq.read_table(tmp_path / "a" / "data" / name)
        tc = pq.read_table(tmp_path / "c" / "data" / name)
        assert ta.column("youtube_id").to_pylist() != tc.column("youtube_id").to_pylist()
        assert ta.column("audio").to_pylist() != tc.column("audio").to_pylist()
    assert plan_clips("train", 5, 7) == plan_clips("train", 5, 7)


# --------------------------------------------------------------------------- classes


def _features(x: np.ndarray, sr: int) -> np.ndarray:
    """Log band energies (shape only, level-free) + temporal statistics; rate independent."""
    mono = x.mean(axis=1) if x.ndim == 2 else x
    frame = int(0.032 * sr)
    n = len(mono) // frame
    frames = mono[: n * frame].reshape(n, frame) * np.hanning(frame)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(frame, 1.0 / sr)
    edges = np.geomspace(60.0, 7800.0, 17)
    bands = np.stack(
        [power[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) for lo, hi in zip(edges[:-1], edges[1:])], axis=1
    )
    total = bands.sum(axis=1) + 1e-12
    shape = np.log(bands.sum(axis=0) + 1e-12)
    shape -= shape.max()
    log_e = np.log(total)
    centroid = (bands * np.arange(bands.shape[1])).sum(axis=1) / total
    loud = log_e > log_e.max() - 6
    trend = np.polyfit(np.linspace(0, 1, n)[loud], centroid[loud], 1)[0] if loud.sum() > 2 else 0.0
    return np.concatenate([np.maximum(shape, -20.0) / 4.0, [np.std(log_e), trend, loud.mean() * 4]])


def _centroid(x: np.ndarray, sr: int) -> float:
    mono = x.mean(axis=1)
    power = np.abs(np.fft.rfft(mono)) ** 2
    freqs = np.fft.rfftfreq(len(mono), 1.0 / sr)
    return float((power * freqs).sum() / power.sum())


def test_low_high_tone_and_noise_spectra_differ() -> None:
    rng = np.random.default_rng(0)
    sr = 16000
    low = _centroid(generate_clip(rng, "low_tone", 1.0, sr, 1), sr)
    high = _centroid(generate_clip(rng, "high_tone", 1.0, sr, 1), sr)
    white = _centroid(generate_clip(rng, "white_noise", 1.0, sr, 1), sr)
    brown = _centroid(generate_clip(rng, "brown_noise", 1.0, sr, 1), sr)
    assert 190 < low < 250
    assert 1700 < high < 2300
    assert white > 3000
    assert brown < 400


def test_classes_separable_by_nearest_centroid_after_codecs() -> None:
    rng = np.random.default_rng(123)
    train_x, train_y = [], []
    for label in SOUND_CLASSES:
        for k in range(3):
            sr = SAMPLE_RATES[k % 4]
            x = generate_clip(rng, label, float(rng.uniform(1.0, 2.0)), sr, 1)
            train_x.append(_features(x, sr))
            train_y.append(label)
    feats = np.array(train_x)
    centroids = np.stack([feats[[y == c for y in train_y]].mean(axis=0) for c in SOUND_CLASSES])

    def classify(x: np.ndarray, sr: int) -> str:
        d = ((centroids - _features(x, sr)) ** 2).sum(axis=1)
        return SOUND_CLASSES[int(np.argmin(d))]

    for label in SOUND_CLASSES:
        for k in range(2):
            sr = SAMPLE_RATES[(k + 1) % 4]
            fmt = FORMATS[(k + SOUND_CLASSES.index(label)) % 4]
            x = generate_clip(rng, label, float(rng.uniform(1.0, 2.0)), sr, 1 + k % 2)
            y, _ = sf.read(io.BytesIO(encode_audio(x, sr, fmt)), dtype="float32", always_2d=True)
            assert classify(y, sr) == label, (label, fmt, sr)

    # A sequence clip: each half is recognised as its own event.
    for first, second in [("high_tone", "white_noise"), ("clicks", "buzz"), ("rising_chirp", "brown_noise")]:
        sr = 22050
        x = generate_clip(rng, f"{first}+{second}", 3.0, sr, 1)
        half = len(x) // 2
        assert classify(x[:half], sr) == first
        assert classify(x[half:], sr) == second


# --------------------------------------------------------------------------- captions


def test_caption_inventory() -> None:
    assert len(SOUND_CLASSES) >= 8 and len(set(SOUND_CLASSES)) == len(SOUND_CLASSES)
    corpus = caption_corpus()
    assert len(corpus) == len(set(corpus))
    for label in all_labels():
        caps = captions_for(label)
        assert len(caps) >= 6 and len(set(caps)) == len(caps)
        for c in caps:
            assert label_for_caption(c) == label
            assert c[0].isupper() and not c.endswith(".")
    assert any("followed by" in c for c in captions_for("high_tone+white_noise"))
    with pytest.raises(ValueError):
        captions_for("no_such_class")
    with pytest.raises(ValueError):
        split_label("buzz+buzz")


def test_caption_corpus_covers_dataset(tables: dict[str, list[dict]]) -> None:
    corpus = set(caption_corpus())
    for rows in tables.values():
        for r in rows:
            assert r["caption"] in corpus


def test_embedded_dataset_is_rebuilt_when_its_settings_change_and_foreign_data_is_left_alone(tmp_path: Path) -> None:
    from af3dist.embedded.assets import SYNTHETIC_MARKER, prepare_embedded
    from af3dist.config import load_config

    def cfg(source: Path, train_clips: int):
        return load_config("tiny", [f"data.source={source}", f"data.synthetic.train_clips={train_clips}",
                                    "data.synthetic.validation_clips=1", "data.synthetic.test_clips=1",
                                    "data.synthetic.long_clips=0", "model.build_tiny=null"])

    def train_rows(source: Path) -> int:
        return sum(pq.read_metadata(p).num_rows for p in (source / "data").glob("train-*.parquet"))

    ours = tmp_path / "ours"
    prepare_embedded(cfg(ours, 3))
    assert train_rows(ours) == 3 and (ours / SYNTHETIC_MARKER).is_file()
    stamp = (ours / "data" / "train-00000-of-00002.parquet").stat().st_mtime_ns
    prepare_embedded(cfg(ours, 3))  # same settings: kept as it is
    assert (ours / "data" / "train-00000-of-00002.parquet").stat().st_mtime_ns == stamp
    prepare_embedded(cfg(ours, 5))  # other settings: rebuilt
    assert train_rows(ours) == 5

    foreign = tmp_path / "foreign"
    make_synthetic_audiocaps(foreign, train_clips=2, validation_clips=1, test_clips=1, shards=1, long_clips=0)
    prepare_embedded(cfg(foreign, 5))  # a dataset we did not build is never overwritten
    assert train_rows(foreign) == 2 and not (foreign / SYNTHETIC_MARKER).exists()


def test_plan_clips_can_fix_format_rate_channels_and_length():
    """Benchmarks want clips of one kind: fixed values replace the cycled ones; the rest of the plan is the
    default plan's (labels, captions, ids), and an unknown format is refused."""
    fixed = plan_clips("train", 9, seed=3, fmt="flac", sample_rate=48000, channels=2, duration_s=10.0)
    default = plan_clips("train", 9, seed=3)
    assert {(s.fmt, s.sample_rate, s.channels, s.duration_s) for s in fixed} == {("flac", 48000, 2, 10.0)}
    assert [(s.label, s.captions, s.audiocap_ids) for s in fixed] == \
        [(s.label, s.captions, s.audiocap_ids) for s in default]
    assert fixed[0].render().shape == (480000, 2)
    with pytest.raises(ValueError, match="unknown format"):
        plan_clips("train", 1, fmt="aiff")

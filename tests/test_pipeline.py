"""The Ray Data pipeline end to end on a local Ray instance over generated shards, and with planted bad rows."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import soundfile as sf

from af3dist.data.batching import window_features
from af3dist.data.errors import DataQualityError, ErrorLedger
from af3dist.data.features import IGNORE_INDEX
from af3dist.data.pipeline import build_dataset
from af3dist.data_check import run_data_pipeline
from af3dist.data.source import read_references, split_files
from af3dist.embedded.encoding import encode_audio

pytestmark = pytest.mark.usefixtures("ray_local")


def _ids(ds) -> list[str]:
    return [r["id"] for r in ds.select_columns(["id"]).take_all()]


def test_split_files_and_reference_grouping(synthetic_dir):
    files = split_files(synthetic_dir, "validation")
    assert [Path(p).name for p in files.paths] == ["validation-00000-of-00002.parquet",
                                                   "validation-00001-of-00002.parquet"]
    refs = read_references(synthetic_dir, "validation")
    assert len(refs) == 6
    for clip in refs.values():
        assert len(clip["references"]) == 5 and len(set(clip["references"])) == 5
    with pytest.raises(FileNotFoundError, match="no shards for split 'dev'"):
        split_files(synthetic_dir, "dev")


def test_every_training_row_comes_through_model_ready(tiny_config, processor):
    table = pa.concat_tables([pq.read_table(p) for p in split_files(tiny_config.data.source, "train").paths])
    ds = build_dataset(tiny_config.data, tiny_config.model.name_or_path, "train")
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == sorted(str(i) for i in table["audiocap_id"].to_pylist())
    captions = dict(zip((str(i) for i in table["audiocap_id"].to_pylist()), table["caption"].to_pylist()))
    for r in rows:
        ids, labels = np.asarray(r["input_ids"]), np.asarray(r["labels"])
        target = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
        assert target == captions[r["id"]].strip() + "<|im_end|>"
        assert window_features(r).shape == (r["num_windows"], 128, 3000)
        assert r["num_windows"] == int(np.ceil(r["duration_s"] / 30.0))
    assert max(r["num_windows"] for r in rows) >= 2  # the clip over 30 s


def test_windows_come_through_ray_bit_for_bit(tiny_config, processor):
    """Rows travel with compact windows (sound_features + sound_pad): rebuilt, they are the Featurizer's own."""
    from af3dist.data.audio import load_waveform
    from af3dist.data.features import Featurizer

    table = pa.concat_tables([pq.read_table(p) for p in split_files(tiny_config.data.source, "train").paths])
    audio = dict(zip((str(i) for i in table["audiocap_id"].to_pylist()), table["audio"].to_pylist()))
    featurizer = Featurizer(processor, tiny_config.data.prompt)
    rows = build_dataset(tiny_config.data, tiny_config.model.name_or_path, "train").take_all()
    assert "input_features" not in rows[0]
    for r in rows[:: max(1, len(rows) // 6)] + [max(rows, key=lambda r: r["num_windows"])]:
        wave = load_waveform(audio[r["id"]]["bytes"], max_seconds=tiny_config.data.max_audio_seconds,
                             quality=tiny_config.data.resample_quality)
        want = featurizer.training_example(wave, r["caption"])
        assert np.array_equal(window_features(r).view(np.uint32), want["input_features"].view(np.uint32))
        assert np.array_equal(r["input_features_mask"], want["input_features_mask"])
        assert np.array_equal(r["input_ids"], want["input_ids"]) and np.array_equal(r["labels"], want["labels"])


def test_shuffle_is_deterministic_from_the_seed(tiny_config):
    cfg = tiny_config.data.model_copy(update={"seed": 5})
    first = _ids(build_dataset(cfg, tiny_config.model.name_or_path, "train"))
    again = _ids(build_dataset(cfg, tiny_config.model.name_or_path, "train"))
    assert first == again


def test_evaluation_split_keeps_one_row_per_clip(tiny_config):
    refs = read_references(tiny_config.data.source, "test")
    keep = frozenset(c["first_id"] for c in refs.values())
    rows = build_dataset(tiny_config.data, tiny_config.model.name_or_path, "test", keep_ids=keep).take_all()
    assert sorted(r["clip_id"] for r in rows) == sorted(refs)


def test_run_summary(tiny_config):
    summary = run_data_pipeline(tiny_config, batch_size=4)
    assert summary["clips"] == 24 and summary["rows_dropped"] == 0 and summary["batches"] == 6
    assert summary["example_target"].endswith("<|im_end|>")
    assert Path(summary["errors_file"]).read_text() == ""


# ---------------------------------------------------------------- planted bad data

def _wav(samples, sr=16000, subtype="PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def _bad_rows() -> list[tuple[str, bytes | None, str]]:
    """(expected reason, audio bytes, caption) for every kind of broken row."""
    tone = (0.3 * np.sin(np.arange(16000 * 3) / 5.0)).astype(np.float32)
    flac = encode_audio(tone[:, None], 16000, "flac")
    wav = _wav(tone)
    mp3 = encode_audio(tone[:, None], 16000, "mp3")
    nan = tone.copy()
    nan[500:900] = np.nan
    return [
        ("corrupt", b"fLaC" + bytes(range(256)) * 20, "A corrupt flac"),
        ("corrupt", flac[: len(flac) // 3], "A truncated flac"),
        ("corrupt", wav[: len(wav) // 2], "A truncated wav"),
        ("corrupt", mp3[: len(mp3) // 2], "A truncated mp3"),
        ("empty_audio", _wav(np.zeros(0, dtype=np.float32)), "Nothing at all"),
        ("non_finite", _wav(nan, subtype="FLOAT"), "Broken samples"),
        ("non_finite", _wav(np.full(16000, np.inf, dtype=np.float32), subtype="FLOAT"), "All infinite"),
        ("empty_caption", wav, "   "),
        ("special_token_in_caption", wav, "A dog<|im_end|> <sound> barks"),
        ("unsupported_codec", b"\x89PNG\r\n\x1a\n" + bytes(2000), "A picture, not audio"),  # M4A now decodes
        ("too_long", encode_audio(np.zeros((16000 * 70, 1), np.float32) + 0.01, 16000, "flac"), "A long hum"),
        ("missing_audio", None, "No bytes"),
    ]


@pytest.fixture(scope="module")
def planted_dir(synthetic_dir, tmp_path_factory):
    """The synthetic train split with every kind of broken row planted into both shards."""
    out = tmp_path_factory.mktemp("planted") / "audiocaps"
    (out / "data").mkdir(parents=True)
    bad = _bad_rows()
    for shard_index, path in enumerate(split_files(synthetic_dir, "train").paths):
        table = pq.read_table(path)
        rows = table.to_pylist()
        for k, (reason, data, caption) in enumerate(bad):
            rows.insert((k * 3) % len(rows), {
                "audio": None if data is None else {"bytes": data, "path": f"bad_{k}.bin"},
                "caption": caption, "audiocap_id": 900000 + 100 * shard_index + k,
                "youtube_id": f"bad{shard_index}_{k:07d}", "start_time": 0})
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / "data" / Path(path).name)
    return str(out)


def test_bad_rows_are_dropped_counted_and_listed(tiny_config, planted_dir):
    cfg = tiny_config.data.model_copy(update={"source": planted_dir, "error_rate_ceiling": 1.0})
    ledger = ErrorLedger.remote(1.0, 1)
    ids = _ids(build_dataset(cfg, tiny_config.model.name_or_path, "train", ledger=ledger))
    good = [str(r) for p in split_files(planted_dir, "train").paths
            for r in pq.read_table(p, columns=["audiocap_id"])["audiocap_id"].to_pylist() if r < 900000]
    assert sorted(ids) == sorted(good)

    expected: dict[str, int] = {}
    for reason, _, _ in _bad_rows():
        expected[reason] = expected.get(reason, 0) + 2  # planted in both shards
    summary = ray.get(ledger.get_summary.remote())
    assert summary["dropped_by_reason"] == expected
    assert summary["rows_seen"] == len(good) + sum(expected.values())


def test_errors_file_and_ceiling(tiny_config, planted_dir):
    ok = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(
        update={"source": planted_dir, "error_rate_ceiling": 0.9})})
    summary = run_data_pipeline(ok, batch_size=4)
    lines = [json.loads(l) for l in Path(summary["errors_file"]).read_text().splitlines()]
    assert len(lines) == summary["rows_dropped"] == 2 * len(_bad_rows()) and summary["clips"] == 24  # 2 shards
    assert {l["reason"] for l in lines} == {r for r, _, _ in _bad_rows()}
    assert all(l["id"].startswith("900") and l["split"] == "train" and l["detail"] for l in lines)

    strict = ok.model_copy(update={"data": ok.data.model_copy(update={"error_rate_ceiling": 0.2,
                                                                      "min_rows_before_ceiling": 10})})
    with pytest.raises(DataQualityError, match=r"over the error-rate ceiling of 20% .*corrupt=\d+"):
        run_data_pipeline(strict, batch_size=4)
    assert Path(strict.output_dir, "data_errors.jsonl").read_text().strip()


def test_several_passes_stream_every_row_once_per_pass(tiny_config):
    from af3dist.data.pipeline import read_split

    one = [r["audiocap_id"] for r in read_split(tiny_config.data, "train").iter_rows()]
    three = [r["audiocap_id"] for r in read_split(tiny_config.data, "train", epoch=0, epochs=3).iter_rows()]
    assert len(three) == 3 * len(one)
    assert all(three.count(i) == 3 for i in set(one))
    assert three[: len(one)] == one  # pass 0 comes first, in its seeded order


def test_task_units_join_small_shards_in_plan_order():
    from af3dist.data.pipeline import task_units

    plan = [{"path": p, "row_group": g, "rows": 50} for p, g in
            [("a", 0), ("a", 1), ("b", 0), ("c", 0), ("c", 1), ("a", 2), ("d", 0)]]
    tasks = task_units(plan, rows_per_task=120)
    # tasks of at least 120 rows, across shards; one unit per run of one shard's consecutive row groups
    assert tasks == [[{"path": "a", "row_groups": [0, 1], "rows": 100}, {"path": "b", "row_groups": [0], "rows": 50}],
                     [{"path": "c", "row_groups": [0, 1], "rows": 100}, {"path": "a", "row_groups": [2], "rows": 50}],
                     [{"path": "d", "row_groups": [0], "rows": 50}]]
    assert [(u["path"], g) for t in tasks for u in t for g in u["row_groups"]] == \
        [(e["path"], e["row_group"]) for e in plan]
    assert task_units(plan, 1) == [[{"path": e["path"], "row_groups": [e["row_group"]], "rows": 50}] for e in plan]
    assert task_units([], 10) == []


def test_a_tasks_reports_are_batched_and_complete():
    """A data task sends seen-row counts at most once per `every_s` (not one remote call per decode batch), sends
    dropped rows at once together with every row it has seen before them, and has sent all when it flushes."""
    from af3dist.data.errors import Reports

    ledger = ErrorLedger.remote(0.5, 1)
    reports = Reports(ledger, every_s=3600)
    for _ in range(5):
        reports.report(8, [])
    assert ray.get(ledger.get_summary.remote())["rows_seen"] == 0  # nothing sent yet (calls land in order)
    bad = {"id": "7", "split": "train", "reason": "corrupt", "detail": "truncated"}
    reports.report(8, [bad])
    assert ray.get(ledger.get_summary.remote()) == {"rows_seen": 48, "rows_dropped": 1,
                                                    "dropped_by_reason": {"corrupt": 1}}
    reports.report(8, [])
    reports.flush()
    assert ray.get(ledger.get_summary.remote())["rows_seen"] == 56 and not reports.pending

    every = Reports(ledger, every_s=0)  # no batching: each report is sent
    every.report(4, [])
    every.flush()
    assert ray.get(ledger.get_summary.remote())["rows_seen"] == 60

    strict = Reports(ErrorLedger.remote(0.2, 1), every_s=3600)
    strict.report(4, [bad, bad])  # 2 of 4 dropped, over a 20% ceiling: raised once the reply has landed
    with pytest.raises(DataQualityError, match="over the error-rate ceiling"):
        strict.flush()


@pytest.mark.parametrize("damage", ["truncated", "not_parquet", "lying_footer_length"])
def test_a_broken_shard_is_named_when_the_pass_is_planned(tiny_config, synthetic_dir, tmp_path, damage):
    """A shard that is cut short, is not parquet at all, or whose footer length points outside the file stops the
    planning with the shard's path, before any task runs (pyarrow alone names no file)."""
    (tmp_path / "data").mkdir()
    paths = split_files(synthetic_dir, "validation").paths
    for path in paths:
        (tmp_path / "data" / Path(path).name).write_bytes(Path(path).read_bytes())
    broken = tmp_path / "data" / Path(paths[1]).name
    data = broken.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "not_parquet":
        data = b"<html>rate limited</html>" * 100
    else:  # footer length (the 4 bytes before the closing PAR1) claims more than the file holds
        data = data[:-8] + (len(data) * 4).to_bytes(4, "little") + b"PAR1"
    broken.write_bytes(data)
    cfg = tiny_config.data.model_copy(update={"source": str(tmp_path)})
    with pytest.raises(ValueError, match=rf"shard .*{broken.name} of split 'validation' is not a readable parquet"):
        build_dataset(cfg, tiny_config.model.name_or_path, "validation")

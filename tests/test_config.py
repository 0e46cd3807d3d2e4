import pytest

from af3dist.config import ConfigError, dump_config, load_config, preset_names


def test_presets_load_and_differ():
    assert {"tiny", "af3"} <= set(preset_names())
    tiny, af3 = load_config("tiny"), load_config("af3")
    assert tiny.model.build_tiny is not None and tiny.data.synthetic is not None
    assert af3.model.name_or_path == "nvidia/audio-flamingo-3-hf"
    assert af3.data.source == "hf://datasets/OpenSound/AudioCaps"
    assert af3.model.dtype == "bfloat16" and af3.model.build_tiny is None


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("tiny", ["data.decode_batch_size=3", "data.shuffle=false", "ray.num_cpus=2",
                               "data.prompt=What do you hear?"])
    assert cfg.data.decode_batch_size == 3 and cfg.data.shuffle is False and cfg.ray.num_cpus == 2
    assert cfg.data.prompt == "What do you hear?"


@pytest.mark.parametrize("override, needle", [
    ("data.resample_quality=best", "data.resample_quality: Input should be 'VHQ', 'HQ', 'MQ', 'LQ' or 'QQ'"),
    ("data.decode_batch_size=0", "data.decode_batch_size: Input should be greater than or equal to 1"),
    ("data.error_rate_ceiling=1.5", "data.error_rate_ceiling"),
    ("data.bogus=1", "data.bogus: unknown field (allowed: source, synthetic"),
    ("model.dtype=fp8", "'auto', 'float32', 'bfloat16' or 'float16'"),
])
def test_bad_values_name_field_and_allowed_values(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert needle in str(err.value)


def test_unknown_preset_or_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("nope")
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config("tiny", ["data.prompt"])


def test_yaml_file_roundtrip(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(load_config("tiny", ["data.seed=7"])))
    assert load_config(str(path)).data.seed == 7


def test_local_paths_expand_but_urls_do_not(monkeypatch):
    monkeypatch.setenv("AF3_TEST_ROOT", "/data/x")
    cfg = load_config("tiny", ["data.source=$AF3_TEST_ROOT/audiocaps"])
    assert cfg.data.source == "/data/x/audiocaps"
    assert load_config("tiny", ["data.source=s3://bucket/a"]).data.source == "s3://bucket/a"


def test_relative_local_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["output_dir=outputs/run", "model.name_or_path=./models/tiny"])
    assert cfg.output_dir == str(tmp_path / "outputs" / "run")
    assert cfg.model.name_or_path == str(tmp_path / "models" / "tiny")
    assert load_config("af3").model.name_or_path == "nvidia/audio-flamingo-3-hf"  # a hub id stays one

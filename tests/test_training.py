"""Fine-tuning end to end on a local Ray instance: 2 CPU workers, a real DeepSpeed engine, real checkpoints."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

from af3dist.config import ConfigError, load_config
from af3dist.training.finetune import check_run, finetune, run_name, storage_path

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

QUICK = ["train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3", "train.log_every=1",
         "train.eval_caption_clips=4", "eval.max_new_tokens=8", "train.warmup_steps=1"]


def _cfg(tiny_config, *overrides):
    from af3dist.config import apply_override, validate

    data = tiny_config.model_dump(mode="json")
    for o in [*QUICK, *overrides]:
        apply_override(data, o)
    return validate(data)


def _records(cfg) -> list[dict]:
    return [json.loads(l) for l in Path(cfg.output_dir, "metrics.jsonl").read_text().splitlines()]


def _checkpoints(cfg) -> list[str]:
    run = Path(storage_path(cfg), Path(cfg.output_dir).name)
    return sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) if run.is_dir() else []


# The resume test's settings: a checkpoint every 2 steps (three kept), each step's example ids logged.
RESUME = ["train.checkpoint_every=2", "train.keep_checkpoints=3", "train.log_sample_ids=true", "train.max_failures=2"]


@pytest.fixture(scope="module")
def zero2_run(ray_local, tiny_model_dir, synthetic_dir, tmp_path_factory):
    """One uninterrupted 6-step ZeRO-2 run with caption evaluations at steps 3 and 6: what it wrote is checked by
    the zero2 test, and it is the reference the resume test compares killed runs with (which later corrupts and
    extends it, so what the zero2 test reads is taken here, right after the run)."""
    out = tmp_path_factory.mktemp("zero2") / "reference"
    base = load_config("tiny", [f"model.name_or_path={tiny_model_dir}", "model.build_tiny=null",
                                f"data.source={synthetic_dir}", "data.synthetic=null", f"output_dir={out}"])
    cfg = _cfg(base, *RESUME)
    summary = finetune(cfg)
    return {"cfg": cfg, "summary": summary, "records": _records(cfg), "checkpoints": _checkpoints(cfg),
            "sample_ids": _sample_ids(cfg), "config": load_config(str(Path(cfg.output_dir, "config.yaml"))),
            "weights": load_file(Path(summary["adapter"], "adapter_model.safetensors"))}


def test_zero2_run_writes_a_loadable_adapter_curves_and_checkpoints(zero2_run):
    cfg, summary, weights = zero2_run["cfg"], zero2_run["summary"], zero2_run["weights"]
    out = Path(cfg.output_dir)
    # the adapter loads the way the upstream guide's inference section loads it
    base = AudioFlamingo3ForConditionalGeneration.from_pretrained(cfg.model.name_or_path)
    model = PeftModel.from_pretrained(base, summary["adapter"])
    assert AutoProcessor.from_pretrained(summary["adapter"]).audio_token_id == base.config.audio_token_id
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # trained, not the zero init
    assert not any("audio_tower" in k for k in weights)
    assert isinstance(model, PeftModel)

    records = zero2_run["records"]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if r["kind"] == "eval"]
    # validation loss at every checkpoint (it ranks them) and eval step; caption scores at the eval steps
    assert [r["step"] for r in evals] == [2, 3, 4, 6] and all("eval_loss" in r for r in evals)
    assert [r["step"] for r in evals if "eval_cider_d" in r] == [3, 6]
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1 for r in records if r["kind"] == "train")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert zero2_run["config"].train.max_steps == 6
    assert zero2_run["checkpoints"] == ["checkpoint_000002", "checkpoint_000004", "checkpoint_000006"]
    assert summary["metrics"]["step"] == 6 and summary["data"]["rows_dropped"] == 0


def test_zero3_adapter_holds_the_real_weights(tiny_config):
    cfg = _cfg(tiny_config, "train.zero_stage=3", "train.max_steps=3", "train.checkpoint_every=3",
               "train.eval_every=3", "train.eval_caption_clips=2")
    summary = finetune(cfg)
    weights = load_file(Path(summary["adapter"], "adapter_model.safetensors"))
    reference = PeftModel.from_pretrained(
        AudioFlamingo3ForConditionalGeneration.from_pretrained(cfg.model.name_or_path), summary["adapter"])
    expected = {n: p.shape for n, p in reference.named_parameters() if "lora_" in n or "modules_to_save" in n}
    assert len(weights) == len(expected) > 0
    for key, tensor in weights.items():
        assert tensor.numel() > 0, f"{key} was saved empty"
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    projector = [v for k, v in weights.items() if "multi_modal_projector" in k and k.endswith("weight")]
    assert projector and all(v.dim() == 2 and v.abs().sum() > 0 for v in projector)


def test_bad_runs_fail_before_any_worker_starts(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="train.zero_stage: Input should be 2 or 3"):
        load_config("tiny", ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        load_config("tiny", ["train.micro_batch_size=0"])
    with pytest.raises(ConfigError, match="model.name_or_path: cannot load '/nonexistent/model'"):
        check_run(_cfg(tiny_config, "model.name_or_path=/nonexistent/model"))
    with pytest.raises(ConfigError, match="need 2 GPUs but the Ray cluster has 0"):
        check_run(_cfg(tiny_config, "train.use_gpu=true"))
    with pytest.raises(ConfigError, match="CPUs, but the Ray cluster has 2"):
        check_run(_cfg(tiny_config, "train.cpus_per_worker=4"))
    cfg = _cfg(tiny_config)
    Path(cfg.output_dir).mkdir(parents=True)
    Path(cfg.output_dir, "config.yaml").write_text(_cfg(tiny_config, "train.learning_rate=0.5").model_dump_json())
    with pytest.raises(ConfigError, match=r"holds another run .*train.learning_rate"):
        check_run(cfg)
    # training longer, or evaluating/checkpointing/logging at another cadence, is the same run: it resumes
    Path(cfg.output_dir, "config.yaml").write_text(
        _cfg(tiny_config, "train.max_steps=99", "train.eval_every=7", "train.log_every=5").model_dump_json())
    check_run(cfg)
    # two output dirs of one name under one shared storage path are two runs
    shared = ["train.storage_path=/tmp/shared-ray-results"]
    a = _cfg(tiny_config, *shared, f"output_dir={tmp_path / 'a' / 'run1'}")
    b = _cfg(tiny_config, *shared, f"output_dir={tmp_path / 'b' / 'run1'}")
    assert run_name(a) != run_name(b) and run_name(a).startswith("run1-")


def _checkpoint_registered(cfg) -> bool:
    """A checkpoint is resumable once the controller has recorded it in the run's snapshot."""
    return bool(_checkpoints(cfg)) and Path(storage_path(cfg), Path(cfg.output_dir).name,
                                            "checkpoint_manager_snapshot.json").is_file()


def _train_worker_pids(since: float) -> list[int]:
    """Training worker processes started after `since` (earlier runs' workers may still be exiting)."""
    return [p.pid for p in psutil.process_iter(["cmdline", "create_time"])
            if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker") and p.info["create_time"] >= since]


DRIVER = """
import sys
from af3dist.config import validate
import json
from af3dist.training.finetune import finetune
finetune(validate(json.loads(sys.argv[1])))
"""


def _sample_ids(cfg) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> the example ids that step trained on, from sample_ids/rank<R>.jsonl."""
    out = {}
    for path in sorted(Path(cfg.output_dir, "sample_ids").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out[(rank, record["step"])] = record["ids"]
    return out


def _kill_a_worker_once(cfg, since: float, after_step: int, killed: list[int]) -> None:
    """SIGKILL one training worker started after `since`, once the run has resumed and written a checkpoint past
    `after_step`: Ray Train must replace it and restore the group from the latest checkpoint."""
    deadline = time.time() + 500
    while time.time() < deadline:
        newer = [c for c in _checkpoints(cfg) if int(c.rsplit("_", 1)[1]) > after_step]
        try:
            resumed = any(r["kind"] == "resume" for r in _records(cfg))
        except (OSError, ValueError):  # not written yet, or a line being written
            resumed = False
        pids = _train_worker_pids(since)
        if newer and resumed and pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])
            return
        time.sleep(0.5)


def test_resume_is_exact_after_a_dead_driver_and_a_killed_worker_and_skips_a_corrupt_checkpoint(tiny_config, zero2_run):
    """One uninterrupted run is the reference for which examples every step sees. (1) A run whose driver is
    killed after its first checkpoint is rerun, and in the rerun one training worker is killed after a newer
    checkpoint (Ray Train replaces it and restores the group): the run still sees exactly the reference's
    examples, none twice, none missed, and its step log has each step once. (2) The reference's latest
    checkpoint corrupted (as a partial upload or a bad disk leaves it), a longer rerun (a rule that refused any
    changed setting would refuse it as "another run", then fail on the bad state) falls back to the checkpoint
    before it, with a warning, and trains on from there."""
    reference, expected = zero2_run["cfg"], zero2_run["sample_ids"]
    assert len(expected) == 2 * 6
    # the killed runs evaluate by validation loss only, at the end: evaluation does not touch the training stream
    steps = [*RESUME, "train.eval_every=6", "train.eval_caption_clips=0"]
    cfg = _cfg(tiny_config, "train.max_steps=6", *steps)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-c", DRIVER, cfg.model_dump_json()]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and not _checkpoint_registered(cfg) and first.poll() is None:
        time.sleep(0.5)
    assert _checkpoint_registered(cfg), "the first driver never checkpointed"
    assert first.poll() is None, "the first driver finished before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)  # let Ray tear down the dead driver's trainer and workers

    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_once, args=(cfg, time.time(), 2, killed), daemon=True)
    killer.start()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    killer.join(timeout=5)
    assert second.returncode == 0, second.stderr[-3000:]
    assert killed, "no training worker of the rerun was found to kill"
    records = _records(cfg)
    resumes = [r for r in records if r["kind"] == "resume"]
    assert len(resumes) >= 2 and resumes[0]["step"] >= 2, resumes  # the rerun's, then the replaced worker's
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 6, train_steps
    assert _sample_ids(cfg) == expected

    states = list(Path(storage_path(reference), run_name(reference), "checkpoint_000006", "deepspeed").rglob("*.pt"))
    assert states
    for f in states:
        f.write_bytes(b"not a pickle")
    longer = _cfg(tiny_config, "train.max_steps=8", *steps, f"output_dir={reference.output_dir}")
    summary = finetune(longer)
    resumes = [r for r in _records(longer) if r["kind"] == "resume"]
    assert resumes and resumes[-1]["step"] == 4, resumes  # the step-6 checkpoint was skipped
    assert summary["metrics"]["step"] == 8
    assert max(r["step"] for r in _records(longer) if r["kind"] == "train") == 8
    # the log keeps what steps 1-4 saw and records the rerun's steps 5-8 (a longer run's stream is longer, so
    # its later batches need not be the 6-step run's)
    resumed = _sample_ids(longer)
    assert {k: v for k, v in resumed.items() if k[1] <= 4} == {k: v for k, v in expected.items() if k[1] <= 4}
    assert sorted(resumed) == [(rank, step) for rank in (0, 1) for step in range(1, 9)]

"""The `ray job submit` workflow end to end on a real 2-node Ray cluster (cluster/local.sh: a head and a worker,
separate raylets, token authentication on): fine-tuning with Train workers on both nodes, a failing job that
reports FAILED with its error in `ray job logs`, batch captioning, and `serve deploy` with a caption over HTTP.
Everything goes through the real CLIs (`ray job ...`, `serve ...`) the way a user runs them."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray") if (BIN / "ray").exists() else shutil.which("ray")
SERVE = str(BIN / "serve") if (BIN / "serve").exists() else shutil.which("serve")
RUNTIME_ENV = "cluster/runtime_env.local.yaml"
BATCH_CAPTION = REPO / "ray_jobs" / "batch_caption.py"
SERVE_CONFIG = REPO / "serving" / "serve_config.yaml"
SERVE_CONFIG_CPU = REPO / "serving" / "serve_config.tiny.yaml"
CPUS_PER_NODE = 3
# 1.6 CPUs a Train worker: two cannot share a 3-CPU node, so PACK placement still puts one on each node, and
# each node keeps 1.4 CPUs for the Ray Data tasks that feed them.
QUICK = ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
         "train.eval_caption_clips=0", "train.warmup_steps=1",
         "train.num_workers=2", "train.cpus_per_worker=1.6"]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports, bound together (one at a time, the kernel may hand the same port out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def marked_pids(cluster_dir: str) -> list[int]:
    """Processes of that local.sh cluster (they inherit AF3DIST_LOCAL_CLUSTER=<dir>)."""
    marker = f"AF3DIST_LOCAL_CLUSTER={cluster_dir}".encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in env and state != "Z":
            pids.append(int(pid))
    return pids


@dataclass
class Cluster:
    dir: str
    env: dict          # what a user's shell has after `eval "$(cluster/local.sh env)"`
    dashboard: str
    shared: Path       # the "shared storage" every node writes to

    def run(self, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, submission_id: str, *entrypoint: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . --runtime-env cluster/runtime_env.local.yaml -- python -m ...`

        Resubmitted once (as `<id>-retry`) when Ray lost the uploaded working dir: an unchanged working dir is
        not uploaded again, and Ray may garbage-collect the package of a job that just ended while the next
        submission still counts on it (ray-project/ray#36703, #46625). The result's `submission_id` says
        which submission ran."""
        for sid in (submission_id, f"{submission_id}-retry"):
            proc = self.run(RAY, "job", "submit", "--submission-id", sid, "--working-dir", ".",
                            "--runtime-env", RUNTIME_ENV, "--", "python", "-m", *entrypoint, timeout=timeout)
            proc.submission_id = sid
            if "Failed to download runtime_env file package" not in proc.stdout + proc.stderr:
                break
        return proc

    def job_status(self, submission_id: str) -> str:
        """`ray job status`: 'Job ... succeeded/failed/was stopped' once terminal, else 'Status for job ...'."""
        out = self.run(RAY, "job", "status", submission_id, timeout=60)
        assert out.returncode == 0, out.stderr
        text = out.stdout + out.stderr
        for status, says in (("SUCCEEDED", "succeeded"), ("FAILED", "failed"), ("STOPPED", "was stopped")):
            if f"Job '{submission_id}' {says}" in text:
                return status
        for status in ("RUNNING", "PENDING"):
            if f"Status for job '{submission_id}': {status}" in text:
                return status
        raise AssertionError(f"no status in: {text}")

    def job_logs(self, submission_id: str) -> str:
        out = self.run(RAY, "job", "logs", submission_id, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def node_ids(self) -> set[str]:
        out = self.run(RAY, "list", "nodes", "--format", "json", timeout=60)
        assert out.returncode == 0, out.stderr
        return {n["node_id"] for n in json.loads(out.stdout) if n["state"] == "ALIVE"}


def _tail(p: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"exit {p.returncode}\n--- stdout ---\n{p.stdout[-n:]}\n--- stderr ---\n{p.stderr[-n:]}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray puts unix sockets under the cluster dir: keep its path short (107-byte limit on socket paths).
    cluster_dir = tempfile.mkdtemp(prefix="af3c-", dir="/tmp")
    port, dash = free_ports(2)
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS")}
    node_env = {**base, "AF3_CLUSTER_DIR": cluster_dir, "AF3_RAY_PORT": str(port), "AF3_DASHBOARD_PORT": str(dash),
                "AF3_CPUS_PER_NODE": str(CPUS_PER_NODE), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    local_sh = ["bash", str(REPO / "cluster" / "local.sh")]
    try:
        up = subprocess.run([*local_sh, "up", "1"], env=node_env, capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, _tail(up)
        assert f"http://127.0.0.1:{dash}" in up.stdout and f"127.0.0.1:{port}" in up.stdout, up.stdout
        exports = subprocess.run([*local_sh, "env"], env=node_env, capture_output=True, text=True, check=True).stdout
        shell_env = dict(node_env)
        for line in exports.splitlines():  # export KEY=VALUE  # comment
            for word in shlex.split(line, comments=True)[1:]:
                key, _, value = word.partition("=")
                shell_env[key] = value
        assert shell_env["RAY_API_SERVER_ADDRESS"] == shell_env["RAY_DASHBOARD_ADDRESS"] == f"http://127.0.0.1:{dash}"
        assert shell_env["RAY_ADDRESS"] == f"127.0.0.1:{port}"
        assert shell_env["RAY_AUTH_MODE"] == "token"
        yield Cluster(cluster_dir, shell_env, f"http://127.0.0.1:{dash}", tmp_path_factory.mktemp("shared"))
    finally:
        down = subprocess.run([*local_sh, "down"], env=node_env, capture_output=True, text=True, timeout=180)
        left = marked_pids(cluster_dir)
        assert down.returncode == 0 and not left, f"{_tail(down)}\nstill running: {left}"
        assert not Path(cluster_dir).exists()


def test_cluster_has_two_nodes_and_token_auth(cluster):
    assert len(cluster.node_ids()) == 2
    # without the token the Jobs API refuses
    no_auth = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                                  "RAY_AUTH_TOKEN_PATH")}
    no_auth["RAY_AUTH_MODE"] = "disabled"
    out = subprocess.run([RAY, "job", "list"], cwd=REPO, env=no_auth, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and ("401" in out.stdout + out.stderr or "nauthorized" in out.stdout + out.stderr), \
        _tail(out)


@pytest.fixture(scope="module")
def finetune_run(cluster, tiny_model_dir, synthetic_dir):
    out = cluster.shared / "runs" / "tiny"
    started = time.time()
    proc = cluster.submit("af3-finetune", "ray_jobs.finetune", "--config", "tiny", "--output-dir", str(out),
                          f"model.name_or_path={tiny_model_dir}", "model.build_tiny=null",
                          f"data.source={synthetic_dir}", "data.synthetic=null", *QUICK)
    return {"proc": proc, "out": out, "seconds": time.time() - started}


def test_finetune_job_trains_on_both_nodes_and_writes_to_shared_storage(cluster, finetune_run):
    proc, out = finetune_run["proc"], finetune_run["out"]
    assert proc.returncode == 0, _tail(proc)
    assert "succeeded" in proc.stdout + proc.stderr
    assert cluster.job_status(proc.submission_id) == "SUCCEEDED"
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    (workers,) = [r for r in records if r["kind"] == "workers"]
    assert len(workers["node_ids"]) == 2
    assert set(workers["node_ids"]) == cluster.node_ids(), "the two Train workers did not run on both nodes"
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert list((out / "ray_results" / "tiny").glob("checkpoint_000002/adapter/adapter_model.safetensors"))
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):proc.stdout.rindex("\n}") + 2])
    assert summary["metrics"]["step"] == 2 and summary["adapter"] == str(out / "adapter")
    print(f"fine-tuning job: {finetune_run['seconds']:.0f} s")


def test_failing_job_reports_failed_with_the_error_in_its_logs(cluster, tmp_path):
    proc = cluster.submit("af3-broken", "ray_jobs.finetune", "--config", "tiny", "--output-dir",
                          str(cluster.shared / "runs" / "broken"), "model.name_or_path=/nonexistent/model",
                          "model.build_tiny=null", timeout=300)
    assert proc.returncode != 0, _tail(proc)
    assert cluster.job_status(proc.submission_id) == "FAILED"
    logs = cluster.job_logs(proc.submission_id)
    assert "model.name_or_path: cannot load '/nonexistent/model'" in logs, logs[-3000:]


def test_batch_caption_job_captions_every_clip(cluster, finetune_run, tiny_model_dir, synthetic_dir):
    if not BATCH_CAPTION.is_file():
        pytest.skip(f"{BATCH_CAPTION.relative_to(REPO)} does not exist yet (batch captioning issue)")
    adapter = finetune_run["out"] / "adapter"
    assert adapter.is_dir(), "needs the fine-tuning job's adapter"
    out = cluster.shared / "captions"
    started = time.time()
    proc = cluster.submit("af3-captions", "ray_jobs.batch_caption", "--model", tiny_model_dir, "--adapter",
                          str(adapter), "--input", synthetic_dir, "--split", "test", "--output", str(out),
                          "--format", "jsonl", "--max-new-tokens", "8", "--max-seconds", "30", "--actors", "1")
    assert proc.returncode == 0, _tail(proc)
    assert cluster.job_status(proc.submission_id) == "SUCCEEDED"
    from af3dist.captioning.inputs import plan_inputs
    from af3dist.captioning.shards import read_output

    rows = read_output(str(out)).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(plan_inputs(synthetic_dir, split="test").ids)
    captioned = [r for r in rows if not r["error"]]
    assert len(captioned) == len(rows) - 1 and all(r["caption"] for r in captioned)  # one clip is over 30 s
    print(f"batch captioning job: {time.time() - started:.0f} s")


def test_serve_deploy_answers_a_caption_over_http(cluster, tiny_model_dir, tmp_path):
    if not SERVE_CONFIG.is_file():
        pytest.skip(f"{SERVE_CONFIG.relative_to(REPO)} does not exist yet (serving issue)")
    # serving/serve_config.yaml is the GPU cluster's file (af3 preset, 1 GPU a replica); its CPU twin
    # serve_config.tiny.yaml is the same app on the embedded default. Deploy that, with this test's model,
    # a free port, and the proxy on the head only (both nodes share this host, so only one can hold the port).
    config = yaml.safe_load((SERVE_CONFIG_CPU if SERVE_CONFIG_CPU.is_file() else SERVE_CONFIG).read_text())
    assert {a["import_path"] for a in config["applications"]} == \
        {a["import_path"] for a in yaml.safe_load(SERVE_CONFIG.read_text())["applications"]}
    (port,) = free_ports(1)
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app["args"] = {**app["args"], "model": tiny_model_dir,
                   "overrides": [*app["args"].get("overrides", []), "serve.gpus_per_replica=0"]}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    started = time.time()
    deploy = cluster.run(SERVE, "deploy", str(path), timeout=180)
    assert deploy.returncode == 0, _tail(deploy)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        status = cluster.run(SERVE, "status", timeout=60)
        pytest.fail(f"the Serve app never became ready:\n{status.stdout}{status.stderr}")
    status = cluster.run(SERVE, "status", timeout=60)
    assert status.returncode == 0 and yaml.safe_load(status.stdout)["applications"][app["name"]]["status"] == "RUNNING"

    from test_serve_engine import make_clips  # the serving tests' clips (flac, wav, mp3, ...)

    clip = make_clips()[1]
    r = requests.post(f"{url}/v1/audio/captions", files={"file": ("clip.wav", clip, "audio/wav")}, timeout=120)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["caption"], str) and r.json()["caption"]
    shutdown = cluster.run(SERVE, "shutdown", "-y", timeout=120)
    assert shutdown.returncode == 0, _tail(shutdown)
    print(f"serve deploy to first caption: {time.time() - started:.0f} s")

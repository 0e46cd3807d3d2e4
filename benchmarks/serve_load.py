"""Bounded HTTP load against the af3dist Serve app on loopback: batched vs. batching off (max batch size 1).

Tiny model on CPU, one model replica, the same clips and settings for both; concurrency 1, 8 and 32, each
for a fixed number of requests per client. Prints a table, then one JSON line with
`batched_rps_c32`, `unbatched_rps_c32`, `vs_unbatched`, `p50_ms_c1`, `p99_ms_c32` (and more).

    python benchmarks/serve_load.py [--requests-per-client 6] [--max-tokens 16]

Open loop (`--open-loop`, issue 12): static batching (`@serve.batch`: a batch runs to its longest request's
end, a sampled request is generated alone) against continuous batching at the same offered loads. The static
side is the server code of `--baseline-rev` (default 4df3247, the last commit with `@serve.batch`; the script
refuses a revision whose app has none), checked out with `git worktree` into a temp dir; the continuous side
is this tree. Each side runs in its own subprocess with its own Ray instance (`PYTHONPATH` at its tree; the
script checks that the driver and a Ray worker both import af3dist from there), one after the other, with the
same tiny model, clips and settings (`--max-tokens`, `--max-batch-size`, `--batch-wait-s`, `--replicas`,
`--set`); worktree and processes are removed at the end, also on failure, Ctrl-C or SIGTERM. A server that
dies while starting (Ray allows its node 30 s to register, too little on a busy machine) is started afresh, up
to `--start-attempts` times.

1. Capacity: the static side's closed-loop completed requests/s at `--capacity-concurrency` (32) clients,
   greedy (the continuous side's is measured the same way, for reference).
2. Offered loads 50%, 80% and 100% of that capacity, greedy, and 100% sampled (temperature 0.7, a seed per
   request), to both sides: Poisson arrivals, at most `--ol-requests` requests over at most `--ol-duration-s`
   seconds, the same schedule, clips and seeds for both sides. Every request is sent at its arrival time
   whether or not earlier ones finished, with a client-side timeout (`--ol-timeout-s`); every
   `--stream-every`-th request is an SSE stream (`stream: true`), whose time to first token is the arrival to
   its first non-empty content chunk (the static server generates a stream whole before sending it).
   Latency runs from the scheduled arrival (so a lagging client cannot hide queueing) to the last byte.
3. Completed requests/s = requests answered in full with 200 / (the last request's end - the first arrival),
   every request counted at its end (done, failed or timed out). Timeouts, HTTP errors and error events in a
   stream are not completed: they are counted by kind, never dropped; percentiles are over completed ones.

Prints one line per side and load, then one JSON line: `capacity_rps`, `static_p99_ms_80`,
`continuous_p99_ms_80`, `p99_ratio_80` (continuous/static), `sampled_rps_ratio` (continuous/static completed
requests/s at 100% sampled), `ttft_p50_ms` (continuous streams at 80%), and per side and load `loads`.

    python benchmarks/serve_load.py --open-loop [--ol-duration-s 30] [--ol-requests 1000] [--ol-timeout-s 30]

By default a run is bounded by two server starts, 2 x 128 closed-loop requests and 8 loads of at most 30 s of
arrivals, 3 s of settling and a tail (the slowest request, at most the 30 s timeout) each: about 7-8 minutes
on a quiet 2-core machine when only the static side's overloaded runs have long tails (estimated, not yet timed
at full length), 10-11 at worst; server starts alone take minutes on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import emit, machine_note  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from af3dist.config import DEFAULT_PROMPT  # noqa: E402


def clips(n: int = 16) -> list[tuple[str, str]]:
    """Varied clips (1.5-10 s, every codec and several rates) as (base64, format)."""
    from af3dist.embedded.captions import all_labels
    from af3dist.embedded.encoding import encode_audio
    from af3dist.embedded.sounds import generate_clip

    rng = np.random.default_rng(0)
    labels = all_labels()
    fmts, rates = ["wav", "flac", "mp3", "ogg"], [16000, 22050, 44100, 48000]
    out = []
    for i in range(n):
        sr, fmt = rates[i % 4], fmts[(i // 4) % 4]
        data = encode_audio(generate_clip(rng, labels[i % len(labels)], float(rng.uniform(1.5, 10)), sr, 1), sr, fmt)
        out.append((base64.b64encode(data).decode(), fmt))
    return out


async def run_load(url: str, pool: list[tuple[str, str]], concurrency: int, per_client: int,
                   max_tokens: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    failures = 0

    async def client(c: int, session) -> None:
        nonlocal failures
        for k in range(per_client):
            data, fmt = pool[(c * per_client + k) % len(pool)]
            body = {"messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": data, "format": fmt}},
                {"type": "text", "text": DEFAULT_PROMPT}]}], "max_tokens": max_tokens}
            start = time.perf_counter()
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                await r.read()
                if r.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - start)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, session) for c in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"rps": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "requests": len(latencies), "failures": failures}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Open loop (--open-loop): static batching (a baseline revision's server) against continuous batching -------

# Runs in a subprocess with PYTHONPATH at one tree: its own Ray instance and the Serve app of that tree, until
# the benchmark closes its stdin (or sends SIGTERM). Prints `READY {json}` once /readyz answers 200.
SERVER_CODE = r'''
import json, os, signal, sys, time

def _term(*_):
    sys.exit(143)

signal.signal(signal.SIGTERM, _term)
spec = json.loads(sys.argv[1])
import ray, requests
from ray import serve
import af3dist.server.app as app

ray.init(address="local", num_cpus=spec["num_cpus"], include_dashboard=False, log_to_driver=False)
try:
    serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})
    serve.run(app.build_app({"config": "tiny", "model": spec["model"], "overrides": spec["overrides"]}),
              name="bench", route_prefix="/")
    url = "http://127.0.0.1:%d/readyz" % spec["port"]
    deadline = time.monotonic() + 300
    while True:
        try:
            if requests.get(url, timeout=10).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the app was not ready within 300 s")
        time.sleep(0.5)

    @ray.remote(num_cpus=0)
    def where():
        import af3dist.server.app as m
        return m.__file__

    with open(app.__file__) as f:
        static = "@serve.batch(" in f.read()
    print("READY " + json.dumps({"app_file": os.path.realpath(app.__file__),
                                 "worker_app_file": os.path.realpath(ray.get(where.remote())),
                                 "serve_batch": static}), flush=True)
    sys.stdin.read()
finally:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
'''


class ServerExited(RuntimeError):
    """The server process ended before it was ready."""


class Server:
    """One side's server subprocess (its own session, so a Ctrl-C reaches only the benchmark, which stops it)."""

    def __init__(self, side: str, tree: Path, spec: dict, log: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        env["PYTHONPATH"] = str(tree)
        self.side, self.tree, self.log = side, tree, log
        self.url = f"http://127.0.0.1:{spec['port']}"
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, json.dumps(spec)], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 420) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if line.startswith("READY "):
                    info = json.loads(line[6:])
                    tree = os.path.realpath(self.tree)
                    for key in ("app_file", "worker_app_file"):
                        if not info[key].startswith(tree + os.sep):
                            raise RuntimeError(f"{self.side}: {key} {info[key]} is not under {tree}")
                    if info["serve_batch"] != (self.side == "static"):
                        raise RuntimeError(f"{self.side}: its app {'has' if info['serve_batch'] else 'lacks'} "
                                           "@serve.batch")
                    return info
            if self.proc.poll() is not None:
                raise ServerExited(f"{self.side} server exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.5)
        raise RuntimeError(f"{self.side} server not ready within {timeout_s:g} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the server shuts Serve and its Ray instance down and exits
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, sig)  # its own process group (start_new_session)
                    try:
                        self.proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        self._log.close()


def body_prefixes(pool: list[tuple[str, str]]) -> list[bytes]:
    """Each clip's request JSON up to its messages, serialized once: a request appends its own fields."""
    return [json.dumps({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": data, "format": fmt}},
        {"type": "text", "text": DEFAULT_PROMPT}]}]})[:-1].encode() for data, fmt in pool]


def make_body(prefix: bytes, max_tokens: int, stream: bool, temperature: float, seed: int | None) -> bytes:
    extra = {"max_tokens": max_tokens}
    if stream:
        extra["stream"] = True
    if temperature > 0:
        extra.update(temperature=temperature, seed=seed)
    return prefix + b", " + json.dumps(extra)[1:].encode()


async def send(session, url: str, body: bytes, stream: bool, scheduled: float, timeout_s: float) -> dict:
    """One request: its end, latency and time to first content chunk from `scheduled`, status and error."""
    import aiohttp

    rec: dict = {"stream": stream, "lag": time.perf_counter() - scheduled, "status": None, "ok": False,
                 "ttft": None, "error": None}
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(f"{url}/v1/chat/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                rec["status"] = r.status
                if r.status != 200:
                    await r.read()
                    rec["error"] = f"http_{r.status}"
                elif not stream:
                    await r.read()
                    rec["ok"] = True
                else:
                    done = finished = False
                    async for line in r.content:
                        line = line.strip()
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        event = json.loads(payload)
                        if "error" in event:
                            rec["error"] = f"stream_error_{event['error'].get('code')}"
                            continue
                        choice = event["choices"][0]
                        if rec["ttft"] is None and choice.get("delta", {}).get("content"):
                            rec["ttft"] = time.perf_counter() - scheduled
                        finished = finished or bool(choice.get("finish_reason"))
                    if rec["error"] is None and not (done and finished):
                        rec["error"] = "stream_incomplete"
                    rec["ok"] = rec["error"] is None
    except TimeoutError:
        rec["error"] = "timeout"
    except (aiohttp.ClientError, ValueError, KeyError, IndexError) as err:
        rec["error"] = type(err).__name__
    rec["end"] = time.perf_counter()
    rec["latency"] = rec["end"] - scheduled
    return rec


def _session():
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None))


def summarize(recs: list[dict], first: float) -> dict:
    done = [r for r in recs if r["ok"]]
    span = max(r["end"] for r in recs) - first if recs else 0.0
    ms = np.array([r["latency"] for r in done]) * 1000
    ttft = np.array([r["ttft"] for r in done if r["stream"] and r["ttft"] is not None]) * 1000
    errors: dict[str, int] = {}
    for r in recs:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1

    def pct(a, q):
        return round(float(np.percentile(a, q)), 1) if len(a) else None

    return {"sent": len(recs), "completed": len(done), "not_completed": len(recs) - len(done), "errors": errors,
            "completed_rps": round(len(done) / span, 2) if span > 0 else 0.0, "span_s": round(span, 2),
            "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99), "max_ms": pct(ms, 100),
            "streams": sum(r["stream"] for r in recs), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "streams_without_content": sum(1 for r in done if r["stream"] and r["ttft"] is None),
            "max_send_lag_ms": round(max(r["lag"] for r in recs) * 1000, 1) if recs else None}


async def closed_loop(url: str, bodies: list[tuple[bytes, bool]], concurrency: int, timeout_s: float) -> dict:
    """`concurrency` clients, each sending its share of `bodies` one after another."""
    async with _session() as session:
        start = time.perf_counter()

        async def client(c: int) -> list[dict]:
            out = []
            for body, stream in bodies[c::concurrency]:
                out.append(await send(session, url, body, stream, time.perf_counter(), timeout_s))
            return out

        recs = [r for rs in await asyncio.gather(*(client(c) for c in range(concurrency))) for r in rs]
    return summarize(recs, start)


async def open_loop(url: str, schedule: list[tuple[float, bytes, bool]], timeout_s: float) -> dict:
    """Each request sent at its arrival time (offset from the start) whatever the earlier ones are doing."""
    async with _session() as session:
        t0 = time.perf_counter() + 0.1
        tasks = []
        for offset, body, stream in schedule:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(session, url, body, stream, t0 + offset, timeout_s)))
        recs = list(await asyncio.gather(*tasks))
    out = summarize(recs, t0 + schedule[0][0]) if schedule else summarize([], 0.0)
    out["arrival_span_s"] = round(schedule[-1][0] - schedule[0][0], 2) if schedule else 0.0
    return out


def poisson_schedule(rate: float, duration_s: float, max_requests: int, seed: int) -> list[float]:
    """Arrival offsets (s) of a Poisson process at `rate`/s: at most `max_requests`, none after `duration_s`."""
    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=max_requests))
    offsets -= offsets[0]
    return [float(t) for t in offsets if t <= duration_s]


def _git(*cmd: str) -> str:
    return subprocess.run(["git", *cmd], cwd=Path(__file__).resolve().parents[1], check=True, text=True,
                          capture_output=True).stdout.strip()


def open_loop_main(args, model: str, pool: list[tuple[str, str]]) -> None:
    repo = Path(__file__).resolve().parents[1]
    started = time.perf_counter()
    fractions = [float(f) for f in args.ol_loads.split(",")]
    overrides = [f"serve.max_batch_size={args.max_batch_size}", f"serve.batch_wait_timeout_s={args.batch_wait_s}",
                 "serve.max_ongoing_requests=64", "serve.cpus_per_replica=0",
                 f"serve.min_replicas={args.replicas}", f"serve.max_replicas={args.replicas}",
                 f"serve.default_max_tokens={args.max_tokens}", *args.set]
    prefixes = body_prefixes(pool)

    def body(k: int, stream: bool, temperature: float = 0.0, seed: int | None = None) -> bytes:
        return make_body(prefixes[k % len(prefixes)], args.max_tokens, stream, temperature, seed)

    every = args.stream_every
    capacity_bodies = [(body(k, False), False) for k in range(args.capacity_concurrency * args.capacity_per_client)]
    warmup = [(body(k, k % 3 == 2, 0.7 if k % 2 else 0.0, k), k % 3 == 2) for k in range(8)]
    tmp = Path(tempfile.mkdtemp(prefix="af3dist-serve-ol-"))
    worktree = tmp / "baseline"
    servers: list[Server] = []
    added = False

    def _term(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _term)
    results: dict[str, dict] = {}
    capacity = {}
    schedules: dict[str, list] = {}
    info = {}
    try:
        rev = _git("rev-parse", "--verify", f"{args.baseline_rev}^{{commit}}")
        _git("worktree", "add", "--detach", str(worktree), rev)
        added = True
        if "@serve.batch(" not in (worktree / "af3dist/server/app.py").read_text():
            raise SystemExit(f"--baseline-rev {args.baseline_rev} ({rev[:9]}): its af3dist/server/app.py has no "
                             "@serve.batch, so it is no static-batching baseline")
        for side, tree in (("static", worktree), ("continuous", repo)):
            for attempt in range(1, args.start_attempts + 1):
                # Ray gives its node 30 s to register: on a busy machine that can fail; a fresh start may not.
                spec = {"model": model, "overrides": overrides, "port": free_port(), "num_cpus": 2}
                server = Server(side, tree, spec, tmp / f"{side}-{attempt}.log")
                servers.append(server)
                try:
                    info[side] = server.wait_ready()
                    break
                except ServerExited as err:
                    server.stop()
                    if attempt == args.start_attempts:
                        raise
                    print(f"{side} server failed to start (attempt {attempt}), retrying: "
                          f"{str(err).splitlines()[-1]}", file=sys.stderr, flush=True)
            print(f"[{time.perf_counter() - started:5.0f} s] {side}: ready, app {info[side]['app_file']}",
                  flush=True)
            w = asyncio.run(closed_loop(server.url, warmup, 4, args.ol_timeout_s))  # first-call costs out
            if w["completed"] == 0:
                raise RuntimeError(f"{side}: no warm-up request completed ({w['errors']}):\n{server.tail()}")
            cap = asyncio.run(closed_loop(server.url, capacity_bodies, args.capacity_concurrency, args.ol_timeout_s))
            capacity[side] = cap
            print(f"[{time.perf_counter() - started:5.0f} s] {side:10s} closed loop c={args.capacity_concurrency}: "
                  f"{cap['completed_rps']:6.2f} done/s  p50 {cap['p50_ms']} ms  p99 {cap['p99_ms']} ms  "
                  f"({cap['completed']}/{cap['sent']} completed{', ' + str(cap['errors']) if cap['errors'] else ''}"
                  f"; warm-up {w['completed']}/{w['sent']})", flush=True)
            if side == "static":
                if cap["completed_rps"] <= 0:
                    raise RuntimeError("the static side completed nothing: no capacity to offer loads from")
                base = cap["completed_rps"]
                loads = [(f"greedy_{round(f * 100)}", f, 0.0) for f in fractions]
                loads.append((f"sampled_{round(args.sampled_load * 100)}", args.sampled_load, args.temperature))
                for i, (label, f, temp) in enumerate(loads):
                    offsets = poisson_schedule(base * f, args.ol_duration_s, args.ol_requests, args.seed + i)
                    schedules[label] = (base * f, [
                        (t, body(k, (k % every == every - 1) if every > 0 else False, temp, 1000 * i + k),
                         (k % every == every - 1) if every > 0 else False) for k, t in enumerate(offsets)])
            results[side] = {}
            for label, (rate, schedule) in schedules.items():
                time.sleep(args.ol_settle_s)
                r = asyncio.run(open_loop(server.url, schedule, args.ol_timeout_s))
                r["offered_rps"] = round(rate, 2)
                results[side][label] = r
                print(f"[{time.perf_counter() - started:5.0f} s] {side:10s} {label:11s} offered {rate:6.2f}/s: "
                      f"{r['completed_rps']:6.2f} done/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                      f"ttft p50 {r['ttft_p50_ms']} ms  ({r['completed']}/{r['sent']} completed"
                      f"{', not completed ' + str(r['errors']) if r['errors'] else ''})", flush=True)
            server.stop()
    except BaseException:
        for s in servers[-1:]:
            print(f"--- {s.side} server log, {s.log.name} (tail) ---\n{s.tail()}", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        for s in servers:
            s.stop()
        if added:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=repo, check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    st, ct = results["static"], results["continuous"]
    mid = f"greedy_{round(0.8 * 100)}" if 0.8 in fractions else f"greedy_{round(fractions[-1] * 100)}"
    sampled = f"sampled_{round(args.sampled_load * 100)}"

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    summary = {
        "capacity_rps": capacity["static"]["completed_rps"],
        "continuous_capacity_rps": capacity["continuous"]["completed_rps"],
        "static_p99_ms_80": st[mid]["p99_ms"], "continuous_p99_ms_80": ct[mid]["p99_ms"],
        "p99_ratio_80": ratio(ct[mid]["p99_ms"], st[mid]["p99_ms"]),
        "static_p50_ms_80": st[mid]["p50_ms"], "continuous_p50_ms_80": ct[mid]["p50_ms"],
        "static_sampled_rps": st[sampled]["completed_rps"], "continuous_sampled_rps": ct[sampled]["completed_rps"],
        "sampled_rps_ratio": ratio(ct[sampled]["completed_rps"], st[sampled]["completed_rps"]),
        "ttft_p50_ms": ct[mid]["ttft_p50_ms"], "static_ttft_p50_ms": st[mid]["ttft_p50_ms"],
        "not_completed": {side: sum(r["not_completed"] for r in res.values()) for side, res in results.items()},
        "loads": results,
        "capacity": capacity,
        "baseline_rev": rev, "current_rev": _git("rev-parse", "HEAD"),
        "current_tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "settings": {"max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
                     "batch_wait_s": args.batch_wait_s, "replicas": args.replicas, "overrides": args.set,
                     "duration_s": args.ol_duration_s, "max_requests": args.ol_requests,
                     "timeout_s": args.ol_timeout_s, "stream_every": every, "temperature": args.temperature,
                     "capacity_concurrency": args.capacity_concurrency, "capacity_per_client": args.capacity_per_client,
                     "load_80_key": mid},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    emit("serve_load", {**summary, **machine_note()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-s", type=float, default=0.02)
    parser.add_argument("--set", action="append", default=[], metavar="serve.field=value",
                        help="more config overrides, applied to both modes (e.g. serve.ingress_replicas=2)")
    ol = parser.add_argument_group("open loop", "static (--baseline-rev) against continuous batching")
    ol.add_argument("--open-loop", action="store_true", help="run the open-loop comparison instead")
    ol.add_argument("--baseline-rev", default="4df3247",
                    help="revision whose server batches statically (@serve.batch); default the last one that does")
    ol.add_argument("--replicas", type=int, default=1, help="model replicas (both sides)")
    ol.add_argument("--capacity-concurrency", type=int, default=32)
    ol.add_argument("--capacity-per-client", type=int, default=4, help="closed-loop requests per client")
    ol.add_argument("--ol-loads", default="0.5,0.8,1.0", help="greedy offered loads, fractions of the capacity")
    ol.add_argument("--sampled-load", type=float, default=1.0, help="offered load of the sampled run")
    ol.add_argument("--temperature", type=float, default=0.7, help="of the sampled run (a seed per request)")
    ol.add_argument("--ol-duration-s", type=float, default=30.0, help="arrivals stop after this (each load)")
    ol.add_argument("--ol-requests", type=int, default=1000, help="at most this many requests per load")
    ol.add_argument("--ol-timeout-s", type=float, default=30.0, help="client-side timeout of a request")
    ol.add_argument("--ol-settle-s", type=float, default=3.0, help="idle pause before each load")
    ol.add_argument("--stream-every", type=int, default=4, help="every N-th request streams (0: none)")
    ol.add_argument("--seed", type=int, default=0, help="of the arrival schedules")
    ol.add_argument("--start-attempts", type=int, default=3, help="server starts to try per side")
    args = parser.parse_args()

    import ray
    import requests
    from ray import serve

    from af3dist.embedded.assets import tokenizer_corpus
    from af3dist.config import TinyModelConfig
    from af3dist.embedded.tiny_model import ensure_tiny_model
    from af3dist.server.app import build_app

    model = str(ensure_tiny_model(Path(tempfile.gettempdir()) / "af3dist-bench" / "tiny-af3", TinyModelConfig(),
                                  tokenizer_corpus(DEFAULT_PROMPT)))
    pool = clips()
    if args.open_loop:
        return open_loop_main(args, model, pool)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results: dict[str, dict[int, dict]] = {}
    for mode, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
        overrides = [f"serve.max_batch_size={batch}", f"serve.batch_wait_timeout_s={args.batch_wait_s}",
                     "serve.max_ongoing_requests=64", "serve.cpus_per_replica=0",
                     f"serve.default_max_tokens={args.max_tokens}", *args.set]
        serve.run(build_app({"config": "tiny", "model": model, "overrides": overrides}), name="bench",
                  route_prefix="/")
        while requests.get(f"{url}/readyz", timeout=10).status_code != 200:
            time.sleep(0.5)
        asyncio.run(run_load(url, pool, 4, 2, args.max_tokens))  # warm up: first-call costs out of the figures
        results[mode] = {}
        for concurrency in (1, 8, 32):
            per_client = args.requests_per_client * (4 if concurrency == 1 else 1)
            r = asyncio.run(run_load(url, pool, concurrency, per_client, args.max_tokens))
            results[mode][concurrency] = r
            print(f"{mode:9s} c={concurrency:2d}: {r['rps']:7.2f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                  f"p95 {r['p95_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  ({r['requests']} requests, "
                  f"{r['failures']} failed)", flush=True)
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    b, u = results["batched"], results["unbatched"]
    summary = {
        "batched_rps_c32": round(b[32]["rps"], 2), "unbatched_rps_c32": round(u[32]["rps"], 2),
        "vs_unbatched": round(b[32]["rps"] / u[32]["rps"], 3),
        "p50_ms_c1": round(b[1]["p50_ms"], 1), "p99_ms_c32": round(b[32]["p99_ms"], 1),
        "p99_c32_vs_p50_c1": round(b[32]["p99_ms"] / b[1]["p50_ms"], 2),
        "batched_rps_c8": round(b[8]["rps"], 2), "unbatched_rps_c8": round(u[8]["rps"], 2),
        "unbatched_p50_ms_c1": round(u[1]["p50_ms"], 1),
        "failures": sum(r["failures"] for m in results.values() for r in m.values()),
        "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "overrides": args.set,
    }
    emit("serve_load", {**summary, **machine_note()})


if __name__ == "__main__":
    main()

"""Bounded HTTP load against the af3dist Serve app on loopback: batched vs. batching off (max batch size 1).

Tiny model on CPU, one model replica, the same clips and settings for both; concurrency 1, 8 and 32, each
for a fixed number of requests per client. Prints a table, then one JSON line with
`batched_rps_c32`, `unbatched_rps_c32`, `vs_unbatched`, `p50_ms_c1`, `p99_ms_c32` (and more).

    python benchmarks/serve_load.py [--requests-per-client 6] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def clips(n: int = 16) -> list[tuple[str, str]]:
    """Varied clips (1.5-10 s, every codec and several rates) as (base64, format)."""
    from af3dist.data.synthetic import all_labels, encode_audio, generate_clip

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
                {"type": "text", "text": "Describe the audio."}]}], "max_tokens": max_tokens}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-s", type=float, default=0.02)
    parser.add_argument("--set", action="append", default=[], metavar="serve.field=value",
                        help="more config overrides, applied to both modes (e.g. serve.ingress_replicas=2)")
    args = parser.parse_args()

    import ray
    import requests
    from ray import serve

    from af3dist.assets import tokenizer_corpus
    from af3dist.config import TinyModelConfig
    from af3dist.model.tiny import ensure_tiny_model
    from af3dist.server.app import build_app

    model = str(ensure_tiny_model(Path(tempfile.gettempdir()) / "af3dist-bench" / "tiny-af3", TinyModelConfig(),
                                  tokenizer_corpus("Describe the audio.")))
    pool = clips()
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
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

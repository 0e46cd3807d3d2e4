"""The Serve app over real HTTP on a local Ray: the openai client, batching without cross-talk, every bad
input, adapters, runtime reconfiguration, autoscaling, and `af3dist serve` start-to-SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from af3dist.embedded.encoding import encode_audio
from af3dist.embedded.sounds import generate_clip
from af3dist.inference import Captioner
from test_serve_engine import make_adapter, make_clips

API_KEY = "test-key"
MAX_TOKENS = 10
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def audio_part(data: bytes, fmt: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


FORMATS = ["flac", "wav", "mp3", "ogg", "wav", "flac"]  # of make_clips()


def overrides(**serve) -> list[str]:
    base = dict(max_batch_size=8, batch_wait_timeout_s=0.3, max_audio_seconds=25, max_body_mb=1,
                default_max_tokens=MAX_TOKENS, max_tokens_limit=32, cpus_per_replica=0, max_adapters_per_replica=1,
                request_timeout_s=120, http_request_timeout_s=200, api_key=API_KEY)
    base.update(serve)
    return [f"serve.{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def served(ray_local, tiny_model_dir, processor, tmp_path_factory):
    from ray import serve

    from af3dist.server.app import build_app

    root = tmp_path_factory.mktemp("served-adapters")
    adapters = {"alpha": make_adapter(tiny_model_dir, root / "alpha", processor, 11),
                "beta": make_adapter(tiny_model_dir, root / "beta", processor, 12)}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"config": "tiny", "model": tiny_model_dir, "adapters": adapters, "overrides": overrides()}
    serve.run(build_app(args), name="af3dist", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz")
    yield {"url": url, "model": tiny_model_dir, "adapters": adapters, "args": args}
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(served):
    """What one clip alone gets from the base model (greedy), computed outside the server."""
    return Captioner.load(served["model"], max_new_tokens=MAX_TOKENS).caption(make_clips())


def chat(url: str, body: dict, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", json=body, headers=headers or HEADERS, timeout=120)


def good_body(clip: bytes, fmt: str, **fields) -> dict:
    return {"model": "tiny-af3", "messages": [{"role": "user", "content": [
        audio_part(clip, fmt), {"type": "text", "text": "Describe the audio."}]}], **fields}


def test_openai_client_plain_and_streaming(served, reference):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key=API_KEY, max_retries=0)
    clip = make_clips()[0]
    messages = good_body(clip, "flac")["messages"]
    plain = client.chat.completions.create(model="tiny-af3", messages=messages, max_tokens=MAX_TOKENS)
    assert plain.choices[0].message.content == reference[0]
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > plain.usage.completion_tokens

    pieces, finish = [], None
    for event in client.chat.completions.create(model="tiny-af3", messages=messages, max_tokens=MAX_TOKENS,
                                                stream=True):
        delta = event.choices[0].delta
        pieces.append(delta.content or "")
        finish = event.choices[0].finish_reason or finish
    assert "".join(pieces) == reference[0] and finish == plain.choices[0].finish_reason
    assert [m.id for m in client.models.list().data] == ["tiny-af3", "alpha", "beta"]


def test_raw_stream_ends_with_done(served):
    r = requests.post(f"{served['url']}/v1/chat/completions", headers=HEADERS, stream=True, timeout=120,
                      json=good_body(make_clips()[1], "wav", stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_concurrent_requests_are_batched_without_cross_talk(served, reference):
    from ray import serve

    clips = make_clips()
    jobs = [(i % len(clips)) for i in range(18)]  # every clip three times, interleaved
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda i: chat(served["url"], good_body(clips[i], FORMATS[i])), jobs))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == [reference[i] for i in jobs]
    stats = serve.get_deployment_handle("AF3Model", "af3dist").stats.remote().result()
    assert max(stats["batch_sizes"]) > 1, stats  # the requests really were generated together


def _too_long_wav() -> bytes:
    return encode_audio(generate_clip(np.random.default_rng(0), "buzz", 26.0, 8000, 1), 8000, "wav")


def _bad_requests(url: str) -> list[tuple[str, requests.Response, int, str | None]]:
    clip = make_clips()[1]
    silent = encode_audio(np.zeros((0, 1), np.float32), 16000, "wav")
    post = lambda body, **kw: requests.post(f"{url}/v1/chat/completions", data=body, timeout=60,
                                            headers={**HEADERS, "Content-Type": "application/json", **kw})
    return [
        ("invalid json", post(b"{not json"), 400, "invalid_json"),
        ("no audio", chat(url, {"messages": [{"role": "user", "content": "hello"}]}), 400, "audio_count"),
        ("five audio parts", chat(url, {"messages": [{"role": "user", "content": [
            audio_part(clip, "wav")] * 5}]}), 400, "audio_count"),
        ("bad base64", chat(url, {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}]}]}), 400, "invalid_base64"),
        ("not audio", chat(url, good_body(b"this is plain text, not audio" * 10, "wav")), 400, None),
        ("empty audio", chat(url, good_body(silent, "wav")), 400, "empty_audio"),
        ("too long", chat(url, good_body(_too_long_wav(), "wav")), 400, "too_long"),
        ("body too large", post(b"{" + b" " * (2 * 2**20) + b"}"), 413, "request_too_large"),
        ("unknown model", chat(url, good_body(clip, "wav", model="gamma")), 404, "model_not_found"),
        ("max_tokens too big", chat(url, good_body(clip, "wav", max_tokens=33)), 400, "invalid_value"),
        ("max_tokens wrong type", chat(url, good_body(clip, "wav", max_tokens="5")), 400, "invalid_value"),
        ("messages wrong type", chat(url, {"messages": {"role": "user"}}), 400, "invalid_value"),
        ("local path", chat(url, {"messages": [{"role": "user", "content": [
            {"type": "audio", "path": "/etc/passwd"}]}]}), 400, "audio_source_not_allowed"),
        ("url", chat(url, {"messages": [{"role": "user", "content": [
            {"type": "audio_url", "audio_url": {"url": "http://169.254.169.254/x.wav"}}]}]}), 400,
         "audio_source_not_allowed"),
        ("no api key", chat(url, good_body(clip, "wav"), headers={"X": "y"}), 401, "invalid_api_key"),
        ("wrong api key", chat(url, good_body(clip, "wav"), headers={"Authorization": "Bearer nope"}), 401,
         "invalid_api_key"),
        ("unknown route", requests.get(f"{url}/v1/nothing", timeout=30), 404, None),
        ("multipart without file", requests.post(f"{url}/v1/audio/captions", headers=HEADERS,
                                                 data={"prompt": "x"}, files={"other": ("a.txt", b"x")},
                                                 timeout=30), 400, None),
        ("multipart not audio", requests.post(f"{url}/v1/audio/captions", headers=HEADERS,
                                              files={"file": ("a.wav", b"garbage" * 20)}, timeout=30), 400, None),
    ]


def test_every_bad_request_gets_a_clear_4xx_and_the_service_goes_on(served, reference):
    for name, response, status, code in _bad_requests(served["url"]):
        assert response.status_code == status, (name, response.status_code, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], name
        if code is not None:
            assert error["code"] == code, (name, error)
    ok = chat(served["url"], good_body(make_clips()[0], "flac"))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == reference[0]


def _generate_reference(model, featurizer, turns, clips: list[bytes]) -> tuple[str, list[int], int]:
    """(text, tokens, prompt tokens) that `model.generate` gives the conversation rendered by the featurizer."""
    from af3dist.data.audio import load_waveform
    from af3dist.data.batching import collate_prompts
    from af3dist.inference import generate_tokens

    tok = featurizer.tokenizer
    row = featurizer.conversation_inputs(turns, [load_waveform(c) for c in clips])
    tokens, _ = generate_tokens(model, collate_prompts([row], tok.pad_token_id), MAX_TOKENS,
                                featurizer.eos_token_id, tok.pad_token_id)[0]
    return tok.decode(tokens, skip_special_tokens=True).strip(), tokens, len(row["input_ids"])


def test_whole_conversations_and_several_clips_get_generates_tokens(served):
    """A follow-up question keeps its context (system prompt, the earlier turn and its clip, the reply) and a
    request may carry several clips: each answer is token for token `model.generate`'s on the rendered input."""
    from af3dist.data.features import Featurizer, Turn, load_processor
    from af3dist.model.loading import load_model

    model = load_model(served["model"]).eval()
    featurizer = Featurizer(load_processor(served["model"]), "Describe the audio.")
    a, b = make_clips()[1], make_clips()[3]
    cases = [
        ({"messages": [{"role": "system", "content": "Answer in a few words."},
                       {"role": "user", "content": [audio_part(a, "wav"), {"type": "text", "text": "What is it?"}]},
                       {"role": "assistant", "content": "white noise"},
                       {"role": "user", "content": "Is it loud?"}]},
         [Turn("system", "Answer in a few words."), Turn("user", "What is it?", 1), Turn("assistant", "white noise"),
          Turn("user", "Is it loud?")], [a]),
        ({"messages": [{"role": "user", "content": [audio_part(a, "wav"), audio_part(b, "ogg"),
                                                    {"type": "text", "text": "Compare the two."}]}]},
         [Turn("user", "Compare the two.", 2)], [a, b]),
        ({"messages": [{"role": "user", "content": [audio_part(b, "ogg")]}, {"role": "assistant", "content": "clicks"},
                       {"role": "user", "content": [{"type": "text", "text": "And this?"}, audio_part(a, "wav")]}]},
         [Turn("user", "", 1), Turn("assistant", "clicks"), Turn("user", "And this?", 1)], [b, a]),
    ]
    for body, turns, clips in cases:
        text, tokens, prompt_tokens = _generate_reference(model, featurizer, turns, clips)
        r = chat(served["url"], {"model": "tiny-af3", **body})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["choices"][0]["message"]["content"] == text
        assert answer["usage"]["completion_tokens"] == len(tokens)
        assert answer["usage"]["prompt_tokens"] == prompt_tokens  # the whole conversation, every clip included


def _streamed(url: str, body: dict) -> tuple[str, str | None]:
    """The concatenated text and the finish_reason of a streamed chat completion."""
    r = requests.post(f"{url}/v1/chat/completions", headers=HEADERS, stream=True, timeout=120,
                      json={**body, "stream": True})
    assert r.status_code == 200, r.text
    pieces, finish = [], None
    for line in r.iter_lines(decode_unicode=True):
        if line and line != "data: [DONE]":
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(pieces), finish


def test_stop_strings_cut_the_answer_streamed_or_not(served, reference):
    i = next(i for i, text in enumerate(reference) if len(text.split()) >= 2)
    full = reference[i]
    stop = full.split()[1][:2]
    want = full[: full.find(stop)].rstrip()
    for stops in (stop, ["zzzq", stop]):
        body = good_body(make_clips()[i], FORMATS[i], stop=stops)
        plain = chat(served["url"], body).json()["choices"][0]
        assert (plain["message"]["content"], plain["finish_reason"]) == (want, "stop")
        assert _streamed(served["url"], body) == (want, "stop")
    assert _streamed(served["url"], good_body(make_clips()[i], FORMATS[i], stop="zzzq"))[0] == full


def test_multipart_captions_for_curl_users(served, reference):
    clip = make_clips()[3]
    r = requests.post(f"{served['url']}/v1/audio/captions", headers=HEADERS, timeout=120,
                      files={"file": ("clip.ogg", io.BytesIO(clip), "audio/ogg")},
                      data={"prompt": "Describe the audio."})
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == reference[3]


def test_adapters_are_chosen_by_model_and_evicted_lru(served):
    from ray import serve

    clips = make_clips()[:2]
    for name in ("alpha", "beta", "alpha"):
        want = Captioner.load(served["model"], adapter=served["adapters"][name],
                              max_new_tokens=MAX_TOKENS).caption(clips)
        got = [chat(served["url"], good_body(c, f, model=name)).json()["choices"][0]["message"]["content"]
               for c, f in zip(clips, FORMATS)]
        assert got == want, name
        stats = serve.get_deployment_handle("AF3Model", "af3dist").stats.remote().result()
        assert stats["loaded_adapters"] == [name]  # max_adapters_per_replica=1: the other one was evicted


def test_health_readiness_and_runtime_batch_settings(served):
    """`serve deploy` of a config whose only change is the model deployment's user_config updates the
    running replica in place (reconfigure), keeping what it has served so far."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    assert requests.get(f"{served['url']}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{served['url']}/readyz", timeout=10).status_code == 200

    def deploy(max_batch_size: int) -> None:
        # What `serve deploy` sends through the dashboard, given to the controller directly (no dashboard here).
        app = {"name": "reconf", "route_prefix": "/reconf", "import_path": "serving.app:build_app",
               "args": {"config": "tiny", "model": served["model"], "overrides": overrides()},
               "deployments": [{"name": "AF3Model", "user_config": {"max_batch_size": max_batch_size,
                                                                    "batch_wait_timeout_s": 0.3}}]}
        _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]), _blocking=True)

    deploy(8)
    handle = serve.get_deployment_handle("AF3Model", "reconf")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: chat(f"{served['url']}/reconf", good_body(make_clips()[i], FORMATS[i])), range(4)))
    before = handle.stats.remote().result()
    assert before["max_batch_size"] == 8 and sum(before["batch_sizes"]) == 4
    deploy(3)
    deadline = time.time() + 60
    while handle.stats.remote().result()["max_batch_size"] != 3 and time.time() < deadline:
        time.sleep(0.5)
    after = handle.stats.remote().result()
    assert after["max_batch_size"] == 3
    assert after["batch_sizes"] == before["batch_sizes"]  # the same replica: not restarted
    serve.delete("reconf")


def test_prometheus_metrics_reach_rays_endpoint(served):
    import ray

    assert chat(served["url"], good_body(make_clips()[1], "wav")).status_code == 200
    chat(served["url"], good_body(b"not audio at all" * 8, "wav"))  # an error, counted by its code
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ("ray_af3dist_requests", "ray_af3dist_request_latency_s_bucket", "ray_af3dist_batch_size_bucket",
              "ray_af3dist_request_errors")
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    assert 'route="chat_completions"' in text and "ray_serve_" in text  # beside Serve's own metrics


def test_a_request_over_the_timeout_gets_a_504_and_the_service_goes_on(served):
    from ray import serve

    from af3dist.server.app import build_app

    # The batch wait alone (0.5 s) outlasts the 0.2 s budget: the gateway answers 504 without waiting for it.
    args = {"config": "tiny", "model": served["model"],
            "overrides": overrides(request_timeout_s=0.2, batch_wait_timeout_s=0.5)}
    serve.run(build_app(args), name="hurried", route_prefix="/hurried")
    try:
        start = time.perf_counter()
        r = chat(f"{served['url']}/hurried", good_body(make_clips()[0], FORMATS[0]))
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout" and time.perf_counter() - start < 10
        assert requests.get(f"{served['url']}/hurried/readyz", timeout=10).status_code == 200
    finally:
        serve.delete("hurried")
    assert chat(served["url"], good_body(make_clips()[0], FORMATS[0])).status_code == 200


@pytest.mark.slow
def test_autoscaling_up_under_load_and_back_down(served):
    from ray import serve

    from af3dist.server.app import build_app

    args = {"config": "tiny", "model": served["model"],
            "overrides": overrides(max_batch_size=1, batch_wait_timeout_s=0, min_replicas=1, max_replicas=2,
                                   target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=3,
                                   max_ongoing_requests=4)}
    serve.run(build_app(args), name="scaling", route_prefix="/scaling")
    url = f"{served['url']}/scaling"
    wait_http(f"{url}/readyz")

    def replicas() -> int:
        dep = serve.status().applications["scaling"].deployments["AF3Model"]
        return dep.replica_states.get("RUNNING", 0)

    stop = threading.Event()

    def load():
        while not stop.is_set():
            chat(url, good_body(make_clips()[2], "mp3"))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 120
        while replicas() < 2 and time.time() < deadline:
            time.sleep(1)
        assert replicas() == 2
    finally:
        stop.set()
        for t in threads:
            t.join()
    deadline = time.time() + 120
    while replicas() > 1 and time.time() < deadline:
        time.sleep(1)
    assert replicas() == 1
    serve.delete("scaling")


@pytest.mark.slow
def test_cli_serves_until_sigterm_then_stops_cleanly(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "AF3DIST_API_KEY": "cli-key", "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "af3dist.cli", "serve", "--model", tiny_model_dir,
                             "--port", str(port), "serve.cpus_per_replica=0", "ray.num_cpus=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=240)
        r = requests.post(f"http://127.0.0.1:{port}/v1/audio/captions", timeout=120,
                          headers={"Authorization": "Bearer cli-key"},
                          files={"file": ("a.wav", make_clips()[1])})
        assert r.status_code == 200 and r.json()["caption"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "af3dist: stopped" in out
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)

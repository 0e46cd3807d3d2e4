"""The model replica's engine and the request protocol, without Serve: adapters, batching, refusals."""

import base64

import numpy as np
import pytest
import torch

from af3dist.config import LoraConfig, ServeConfig
from af3dist.data.features import Featurizer
from af3dist.embedded.encoding import encode_audio
from af3dist.embedded.sounds import generate_clip
from af3dist.inference import Captioner
from af3dist.model.loading import add_lora, load_model
from af3dist.server.engine import Engine, GenRequest, featurize
from af3dist.server.protocol import ApiError, parse_chat_request

PROMPT = "Describe the audio."


def make_adapter(base_dir: str, out, processor, seed: int) -> str:
    """An adapter with non-trivial weights, as training would leave it."""
    torch.manual_seed(seed)
    model = add_lora(load_model(base_dir), LoraConfig())
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def make_clips(seed: int = 5) -> list[bytes]:
    rng = np.random.default_rng(seed)
    specs = [("low_tone", 10.0, 48000, 2, "flac"), ("white_noise", 3.0, 16000, 1, "wav"),
             ("beeps", 20.0, 44100, 1, "mp3"), ("clicks", 1.5, 22050, 2, "ogg"),
             ("buzz", 6.0, 32000, 1, "wav"), ("rising_chirp", 4.0, 44100, 2, "flac")]
    return [encode_audio(generate_clip(rng, label, d, sr, ch), sr, fmt) for label, d, sr, ch, fmt in specs]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, processor, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    return {name: make_adapter(tiny_model_dir, root / name, processor, seed)
            for name, seed in (("alpha", 11), ("beta", 12))}


def _requests(featurizer, clips, max_tokens, adapter=None):
    return [GenRequest(featurize(featurizer, c, PROMPT, 60), m, adapter=adapter) for c, m in zip(clips, max_tokens)]


def test_engine_batches_equal_solo_and_adapters_switch(tiny_model_dir, processor, adapters):
    engine = Engine(tiny_model_dir, dtype="float32", adapters=adapters)
    featurizer = Featurizer(processor, PROMPT)
    clips = make_clips()
    budgets = [12, 3, 12, 7, 12, 1]
    batch = engine.generate(_requests(featurizer, clips, budgets))
    solo = [engine.generate(_requests(featurizer, [c], [m]))[0] for c, m in zip(clips, budgets)]
    assert [(r.token_ids, r.finish_reason) for r in batch] == [(r.token_ids, r.finish_reason) for r in solo]
    assert all(len(r.token_ids) <= m for r, m in zip(batch, budgets))
    assert batch[5].finish_reason == "length" and len(batch[5].token_ids) == 1

    reference = Captioner.load(tiny_model_dir, max_new_tokens=12).caption(clips)
    assert [r.text for r in engine.generate(_requests(featurizer, clips, [12] * 6))] == reference

    want = {name: Captioner.load(tiny_model_dir, adapter=path, max_new_tokens=12).caption(clips)
            for name, path in adapters.items()}
    for name in ("alpha", "beta"):
        got = [r.text for r in engine.generate(_requests(featurizer, clips, [12] * 6, adapter=name))]
        assert got == want[name] and got != reference
    # The base is still the base with adapters loaded, and after they are all evicted.
    assert [r.text for r in engine.generate(_requests(featurizer, clips, [12] * 6))] == reference
    engine.unload_adapter("alpha")
    engine.unload_adapter("beta")
    assert engine.adapter_paths == {}
    assert [r.text for r in engine.generate(_requests(featurizer, clips, [12] * 6))] == reference
    # Evicted adapters come back on demand, unchanged.
    for name in ("beta", "alpha", "beta"):
        got = [r.text for r in engine.generate(_requests(featurizer, clips, [12] * 6, adapter=name))]
        assert got == want[name]
    with pytest.raises(ValueError, match="mix adapters"):
        engine.generate(_requests(featurizer, clips[:1], [4]) + _requests(featurizer, clips[:1], [4], "alpha"))


def test_sampling_is_reproducible_with_a_seed(tiny_model_dir, processor):
    engine = Engine(tiny_model_dir, dtype="float32")
    featurizer = Featurizer(processor, PROMPT)
    clip = make_clips()[0]

    def sample(seed, companions=0):
        reqs = [GenRequest(featurize(featurizer, clip, PROMPT, 60), 12, temperature=1.5, seed=seed)]
        reqs += _requests(featurizer, make_clips()[1:1 + companions], [12] * companions)
        return engine.generate(reqs)[0].token_ids

    assert sample(7) == sample(7) == sample(7, companions=3)
    assert any(sample(s) != sample(7) for s in range(8, 14))


def _audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def _body(*parts, **fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}], **fields}


def test_protocol_parses_what_openai_clients_send():
    cfg = ServeConfig(default_max_tokens=20, max_tokens_limit=50)
    req = parse_chat_request(_body(_audio_part(b"RIFF"), {"type": "text", "text": "What is it?"},
                                   max_completion_tokens=9, temperature=0.5, seed=3, stream=True,
                                   user="ignored", n=1), cfg)
    assert ([a.data for a in req.audio], req.turns[-1].text, req.max_tokens, req.temperature, req.seed,
            req.stream, req.stop) == ([b"RIFF"], "What is it?", 9, 0.5, 3, True, None)
    assert parse_chat_request(_body(_audio_part(b"x")), cfg).max_tokens == 20
    # The whole conversation is kept, in order: developer is read as system, clips in any user turn.
    multi = {"messages": [{"role": "developer", "content": "be brief"},
                          {"role": "user", "content": [_audio_part(b"x"), {"type": "text", "text": "old"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                          {"role": "user", "content": [{"type": "text", "text": "new"}, _audio_part(b"y")]}],
             "stop": ["\n", "END"]}
    req = parse_chat_request(multi, cfg)
    assert [(t.role, t.text, [a.data for a in t.audio]) for t in req.turns] == [
        ("system", "be brief", []), ("user", "old", [b"x"]), ("assistant", "ok", []), ("user", "new", [b"y"])]
    assert [a.param for a in req.audio] == ["messages.1.content.0", "messages.3.content.1"]
    assert req.stop == ["\n", "END"] and parse_chat_request(_body(_audio_part(b"x"), stop="."), cfg).stop == ["."]
    assert parse_chat_request(_body(_audio_part(b"x"), stop=[]), cfg).stop is None


@pytest.mark.parametrize("body, code_or_param", [
    (_body({"type": "text", "text": "no audio"}), "audio_count"),
    (_body(*[_audio_part(b"a")] * 5), "audio_count"),
    ({"messages": [{"role": "user", "content": [_audio_part(b"a")]},
                   {"role": "assistant", "content": [_audio_part(b"b")]},
                   {"role": "user", "content": "and?"}]}, "messages.1.content.0"),
    ({"messages": [{"role": "system", "content": [_audio_part(b"a")]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [_audio_part(b"a")]}, {"role": "assistant", "content": "ok"}]},
     "messages.1"),
    (_body(_audio_part(b"x"), stop=["a", "b", "c", "d", "e"]), "stop"),
    (_body(_audio_part(b"x"), stop=["ok", ""]), "stop.1"),
    (_body(_audio_part(b"x"), stop="x" * 65), "stop"),
    (_body(_audio_part(b"x"), stop=[1]), "stop"),
    (_body(_audio_part(b"x"), stop={"a": 1}), "stop"),
    (_body({"type": "input_audio", "input_audio": {"data": "%%%not-base64", "format": "wav"}}), "invalid_base64"),
    (_body({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav; rm"}}), "invalid_value"),
    (_body(_audio_part(b"x"), max_tokens=0), "invalid_value"),
    (_body(_audio_part(b"x"), max_tokens=51), "invalid_value"),
    (_body(_audio_part(b"x"), max_tokens="ten"), "max_tokens"),
    (_body(_audio_part(b"x"), temperature="hot"), "temperature"),
    (_body(_audio_part(b"x"), stream="yes"), "stream"),
    (_body(_audio_part(b"x"), n=2), "n"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ([1, 2], None),
    (_body({"type": "image_url", "image_url": {"url": "http://x"}}), "messages.0.content.0.type"),
    (_body({"type": "audio", "path": "/etc/passwd"}), "audio_source_not_allowed"),
    (_body({"type": "audio", "url": "https://example.com/a.wav"}), "audio_source_not_allowed"),
    (_body({"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}), "audio_source_not_allowed"),
])
def test_protocol_refuses_bad_requests_precisely(body, code_or_param):
    with pytest.raises(ApiError) as err:
        parse_chat_request(body, ServeConfig(default_max_tokens=20, max_tokens_limit=50))
    assert err.value.status == 400
    if code_or_param is not None:
        assert code_or_param in (err.value.code, err.value.param) or err.value.param.startswith(code_or_param)


def test_paths_are_read_only_inside_allowed_folders(tmp_path):
    """The parser keeps the path as sent; sources.read_source resolves it (off the event loop) and reads it
    only inside an allowed folder."""
    from af3dist.server.sources import read_source

    allowed = tmp_path / "clips"
    allowed.mkdir()
    (allowed / "a.wav").write_bytes(b"RIFF-ish")
    (tmp_path / "secret.wav").write_bytes(b"secret")
    (tmp_path / "clips-other").mkdir()
    (tmp_path / "clips-other" / "a.wav").write_bytes(b"other")
    (allowed / "link.wav").symlink_to(tmp_path / "secret.wav")
    cfg = ServeConfig(allowed_audio_sources=[str(allowed)])
    inside = parse_chat_request(_body({"type": "audio", "path": str(allowed / "a.wav")}), cfg)
    assert inside.audio[0].location == str(allowed / "a.wav")
    assert read_source(inside.audio[0].location, cfg) == b"RIFF-ish"
    for sneaky in (str(allowed / ".." / "secret.wav"), str(tmp_path / "clips-other" / "a.wav"),
                   str(allowed / "link.wav")):
        with pytest.raises(ApiError, match="not allowed"):
            read_source(sneaky, cfg)


@pytest.mark.parametrize("path", ["serving/serve_config.yaml", "serving/serve_config.tiny.yaml"])
def test_serve_configs_are_valid_and_build_our_deployments(path):
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from af3dist.config import load_config

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / path).read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert module == "serving.app" and attr == "build_app"
    import serving.app

    assert callable(getattr(serving.app, attr))
    from af3dist.server.app import deployment_options

    cfg = load_config(app["args"]["config"], app["args"].get("overrides"))  # the args are a valid af3dist config
    assert set(deployment_options(cfg.serve)) == {"AF3Model", "Gateway"}


def test_a_cancelled_request_frees_its_slot_at_once(tiny_model_dir, processor):
    """A request whose caller goes away leaves the running batch before the next step (its KV slot is free for
    the next admission) and a queued one never starts; the others are unaffected."""
    import threading

    from af3dist.server.engine import GenResult

    engine = Engine(tiny_model_dir, dtype="float32", max_batch_size=1)
    features = featurize(Featurizer(processor, PROMPT), make_clips()[1], PROMPT, 60)
    solo = engine.generate([GenRequest(features, 8)])[0]
    first_piece, release = threading.Event(), threading.Event()

    def hold(_piece: str) -> None:  # the scheduler waits here, mid-request, until the test has cancelled
        first_piece.set()
        release.wait(10)

    running = engine.submit(GenRequest(features, 1000, on_text=hold))
    assert first_piece.wait(30)
    queued = engine.submit(GenRequest(features, 8))
    assert running.cancel() and queued.cancel()
    release.set()
    after = engine.submit(GenRequest(features, 8)).result(timeout=60)  # it needs the one slot
    assert isinstance(after, GenResult) and after.token_ids == solo.token_ids
    assert engine.cancelled == 2 and not engine.core.rows and not engine._futures


def test_a_closed_stream_cancels_its_request_in_the_replica():
    """When the client of a stream goes away, Serve closes the replica's generator: the request is cancelled
    in the engine (which then frees its slot, as above) instead of decoding to its end."""
    import asyncio
    from concurrent.futures import Future

    from af3dist.server.app import AF3Model

    class FakeEngine:
        admitted: list[int] = []

        def __init__(self):
            self.future: Future = Future()

        def submit(self, request):
            request.on_text("piece")
            return self.future

    replica = AF3Model.__new__(AF3Model)
    replica.engine, replica._observed = FakeEngine(), 0
    replica.batch_metric = type("NoMetric", (), {"observe": lambda self, n: None})()

    async def first_then_close() -> str:
        stream = replica.generate_stream(GenRequest({}, 4))
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert asyncio.run(first_then_close()) == "piece"
    assert replica.engine.future.cancelled()

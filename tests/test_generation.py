"""The shared generation engine against `model.generate`, with the tiny AF3 on CPU: greedy tokens equal for
every row (mixed clip lengths, one over 30 s, mixed budgets, base and adapter, rows joining mid-flight), a
sampled request independent of its batch-mates, streaming, stop strings, and the callers built on it."""

import numpy as np
import pytest
import torch

from af3dist.data.batching import collate_prompts
from af3dist.data.features import Featurizer
from af3dist.embedded.encoding import encode_audio
from af3dist.embedded.sounds import generate_clip
from af3dist.generation import GenerationEngine, GenFailure, GenRequest, GenResult
from af3dist.inference import Captioner, generate_tokens
from af3dist.model.loading import load_model
from af3dist.server.engine import featurize
from test_serve_engine import make_adapter, make_clips

PROMPT = "Describe the audio."
BUDGETS = [12, 3, 16, 7, 12, 1, 9]


@pytest.fixture(scope="module")
def rows(processor):
    """Featurized clips of 1.5-20 s and one of 40 s (two 30 s windows)."""
    long_clip = encode_audio(generate_clip(np.random.default_rng(3), "buzz", 40.0, 16000, 1), 16000, "wav")
    featurizer = Featurizer(processor, PROMPT)
    return [featurize(featurizer, c, PROMPT, 60) for c in [*make_clips(), long_clip]]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, processor, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("gen-adapter") / "a", processor, 21)


def reference(model, processor, row, max_tokens):
    """(tokens, finish_reason) that `model.generate` gives the row alone."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tokens, finished = generate_tokens(model, collate_prompts([row], tok.pad_token_id), max_tokens, eos,
                                       tok.pad_token_id)[0]
    return tokens, "stop" if finished and len(tokens) < max_tokens else "length"


@pytest.mark.parametrize("with_adapter", [False, True])
def test_greedy_equals_generate_for_every_row(tiny_model_dir, processor, adapter_dir, rows, with_adapter):
    model = load_model(tiny_model_dir, adapter=adapter_dir if with_adapter else None).eval()
    want = [reference(model, processor, r, m) for r, m in zip(rows, BUDGETS)]
    assert any(len(t) > 1 for t, _ in want)
    # 3 slots for 7 requests: the later ones join a running batch as earlier ones finish.
    engine = GenerationEngine(model, processor.tokenizer, max_batch_size=3)
    got = engine.generate([GenRequest(r, m) for r, m in zip(rows, BUDGETS)])
    assert [(g.token_ids, g.finish_reason) for g in got] == want
    assert all(g.prompt_tokens == len(r["input_ids"]) for g, r in zip(got, rows))
    assert [g.text for g in got] == [processor.tokenizer.decode(t, skip_special_tokens=True).strip()
                                     for t, _ in want]
    # And all at once, in slots enough for every row.
    wide = GenerationEngine(model, processor.tokenizer, max_batch_size=8)
    assert [g.token_ids for g in wide.generate([GenRequest(r, m) for r, m in zip(rows, BUDGETS)])] == [
        t for t, _ in want]


def test_conversations_with_several_clips_equal_generate(tiny_model_dir, processor, rows):
    """Whole conversations (system prompt, earlier turns, replies) and several clips per request: the engine's
    tokens are `model.generate`'s on the same rendered input, batched with a single-clip row."""
    from af3dist.data.audio import load_waveform
    from af3dist.data.features import Turn

    model = load_model(tiny_model_dir).eval()
    featurizer = Featurizer(processor, PROMPT)
    a, b = (load_waveform(c) for c in make_clips()[1:3])
    chats = [featurizer.conversation_inputs([Turn("system", "Answer briefly."), Turn("user", PROMPT, 1),
                                             Turn("assistant", "a noise"), Turn("user", "Is it loud?")], [a]),
             featurizer.conversation_inputs([Turn("user", "Compare the two.", 2)], [a, b]),
             featurizer.conversation_inputs([Turn("user", PROMPT, 1), Turn("assistant", "beeps"),
                                             Turn("user", "And now?", 1)], [b, a])]
    want = [reference(model, processor, r, 12) for r in chats]
    engine = GenerationEngine(model, processor.tokenizer, max_batch_size=4)
    got = engine.generate([GenRequest(r, 12) for r in [*chats, rows[0]]])
    assert [(g.token_ids, g.finish_reason) for g in got[:3]] == want
    assert got[3].token_ids == reference(model, processor, rows[0], 12)[0]


def test_a_row_joining_mid_flight_equals_it_alone(tiny_model_dir, processor, rows):
    model = load_model(tiny_model_dir).eval()
    engine = GenerationEngine(model, processor.tokenizer, max_batch_size=4)
    alone = engine.generate([GenRequest(rows[6], 16)])[0]
    done = dict(engine.admit([GenRequest(rows[0], 16), GenRequest(rows[2], 16)], ["a", "b"]))
    for _ in range(5):
        done.update(engine.step())
    assert engine.rows  # the first two are still decoding
    done.update(engine.admit([GenRequest(rows[6], 16)], ["late"]))
    while engine.rows:
        done.update(engine.step())
    assert done["late"].token_ids == alone.token_ids == reference(model, processor, rows[6], 16)[0]
    assert engine.free_slots == 4  # every finished row gave its slot back


def test_a_sampled_request_does_not_depend_on_its_batch(tiny_model_dir, processor, rows):
    model = load_model(tiny_model_dir).eval()
    engine = GenerationEngine(model, processor.tokenizer, max_batch_size=6)
    sampled = GenRequest(rows[0], 16, temperature=1.5, top_p=0.95, seed=7)
    alone = engine.generate([sampled])[0].token_ids
    mates = [GenRequest(rows[1], 8), GenRequest(rows[2], 16, temperature=1.0, seed=1), GenRequest(rows[3], 12)]
    assert engine.generate([mates[0], sampled, *mates[1:]])[1].token_ids == alone
    assert engine.generate([*mates, sampled])[3].token_ids == alone
    others = {tuple(engine.generate([GenRequest(rows[0], 16, temperature=1.5, top_p=0.95, seed=s)])[0].token_ids)
              for s in range(8, 14)}
    assert others - {tuple(alone)}  # the seed matters


def test_streamed_pieces_concatenate_to_the_text(tiny_model_dir, processor, rows):
    model = load_model(tiny_model_dir).eval()
    engine = GenerationEngine(model, processor.tokenizer, max_batch_size=4)
    plain = engine.generate([GenRequest(r, 16) for r in rows[:4]])
    pieces: list[list[str]] = [[] for _ in range(4)]
    streamed = engine.generate([GenRequest(r, 16, on_text=pieces[i].append) for i, r in enumerate(rows[:4])])
    assert [s.text for s in streamed] == [p.text for p in plain]
    assert ["".join(p) for p in pieces] == [p.text for p in plain]
    assert max(len(p) for p in pieces) > 1  # really piece by piece


def test_stop_strings_end_the_answer_before_them(tiny_model_dir, processor, rows):
    model = load_model(tiny_model_dir).eval()
    engine = GenerationEngine(model, processor.tokenizer, max_batch_size=2)
    full = engine.generate([GenRequest(rows[2], 16)])[0]
    words = full.text.split()
    assert len(words) >= 2
    stop = words[1][:2]
    cut = engine.generate([GenRequest(rows[2], 16, stop=[stop])])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)].rstrip()
    assert stop not in cut.text and cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_failures_are_isolated_or_raised_as_asked(tiny_model_dir, processor, rows):
    model = load_model(tiny_model_dir).eval()
    broken = dict(rows[1], input_ids=np.array([10**6, *rows[1]["input_ids"][1:]]))
    isolating = GenerationEngine(model, processor.tokenizer, max_batch_size=4)
    out = isolating.generate([GenRequest(rows[0], 4), GenRequest(broken, 4), GenRequest(rows[2], 4)])
    assert [type(o) for o in out] == [GenResult, GenFailure, GenResult]
    strict = GenerationEngine(model, processor.tokenizer, max_batch_size=4, isolate_failures=False)
    with pytest.raises(IndexError):
        strict.generate([GenRequest(rows[0], 4), GenRequest(broken, 4)])
    assert not strict.rows and strict.generate([GenRequest(rows[0], 4)])[0].token_ids == out[0].token_ids


def test_captioner_casts_features_to_a_bf16_model(tiny_model_dir, rows):
    """Captioner goes through the engine, which feeds the encoder in the model's dtype (bf16 here)."""
    captioner = Captioner.load(tiny_model_dir, dtype="bfloat16", device="cpu", max_new_tokens=4)
    assert captioner.model.dtype == torch.bfloat16
    assert all(isinstance(c, str) for c in captioner.caption(make_clips()[:2]))


def test_audio_text_to_text_pipeline_after_import(adapter_dir, tmp_path):
    """The upstream guide's last step, as written, against the tiny merged model: after `import af3dist`."""
    import af3dist  # noqa: F401 - registers the task
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor, pipeline

    from af3dist.model.merge import merge_adapter

    merged_dir = merge_adapter(adapter_dir, str(tmp_path / "merged"))
    merged_model = AudioFlamingo3ForConditionalGeneration.from_pretrained(merged_dir)
    processor = AutoProcessor.from_pretrained(merged_dir)
    pipe = pipeline("audio-text-to-text", model=merged_model, processor=processor)

    clip = make_clips()[1]  # a 3 s WAV
    path = tmp_path / "clip.wav"
    path.write_bytes(clip)
    want = Captioner.load(str(merged_dir), max_new_tokens=6).caption(clip)
    out = pipe(clip, generate_kwargs={"max_new_tokens": 6})
    assert out == [{"generated_text": want}] and want
    assert pipe(str(path), generate_kwargs={"max_new_tokens": 6}) == out
    from af3dist.inference import to_waveform

    assert pipe(to_waveform(clip), generate_kwargs={"max_new_tokens": 6}) == out  # a 16 kHz array
    assert pipe([clip, str(path)], generate_kwargs={"max_new_tokens": 6}) == [out, out]
    short = pipe(clip, generate_kwargs={"max_new_tokens": 2})[0]["generated_text"]
    assert short == Captioner.load(str(merged_dir), max_new_tokens=2).caption(clip) != want

"""build_dataset's rows carry compact log-mel windows (sound_features + sound_pad): what the model sees must be
exactly what it saw when rows carried the processor's whole windows (input_features)."""

import numpy as np
import pytest
import torch

from af3dist.data.batching import (audio_inputs, collate, collate_prompts, compact_windows, expand_windows,
                                   window_features, with_window_features)
from af3dist.data.features import Featurizer
from af3dist.data.pipeline import featurize_rows, ragged

# (seconds, kind): noise and tones of several lengths, sound up to the window's end (30 s, where the extractor
# takes the stock path and no frame is padding), two and three windows, silence, a clip ending in silence.
CLIPS = [(0.5, "noise"), (3.0, "tone"), (10.0, "noise"), (9.97, "tone"), (30.0, "noise"), (40.0, "tone"),
         (65.0, "noise"), (4.0, "silence"), (6.0, "silent_tail")]


def _wave(rng, seconds: float, kind: str) -> np.ndarray:
    n = int(16000 * seconds)
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "tone":
        return (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.float32)
    wave = rng.standard_normal(n).astype(np.float32) * 0.1
    if kind == "silent_tail":
        wave[n // 3:] = 0
    return wave


@pytest.fixture(scope="module")
def featurizer(processor):
    return Featurizer(processor, "Describe the audio.")


@pytest.fixture(scope="module")
def rows(featurizer, tiny_model_dir):
    """The same clips featurized the old way (Featurizer, whole windows) and by the pipeline (compact)."""
    rng = np.random.default_rng(0)
    waves = [_wave(rng, s, k) for s, k in CLIPS]
    captions = [f"Caption number {i}." for i in range(len(waves))]
    full = []
    for w, c in zip(waves, captions):
        ex = featurizer.training_example(w, c)
        ex["num_windows"], ex["num_tokens"] = ex["input_features"].shape[0], len(ex["input_ids"])
        full.append(ex)
    batch = {"id": np.array([str(i) for i in range(len(waves))], dtype=object),
             "clip_id": np.array([f"clip{i}" for i in range(len(waves))], dtype=object),
             "caption": np.array(captions, dtype=object), "duration_s": np.array([len(w) / 16000 for w in waves]),
             "waveform": ragged(waves)}
    out = featurize_rows(batch, processor=tiny_model_dir, prompt="Describe the audio.", split="train")
    compact = [{k: v[i] for k, v in out.items()} for i in range(len(waves))]
    return full, compact


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.int32) if a[k].is_floating_point() else a[k],
                           b[k].view(torch.int32) if b[k].is_floating_point() else b[k]), k  # bit for bit


def _old_collate_audio(rows):
    """What collate returned before rows went compact: the rows' whole windows, concatenated."""
    return (torch.from_numpy(np.concatenate([np.asarray(r["input_features"]) for r in rows])),
            torch.from_numpy(np.concatenate([np.asarray(r["input_features_mask"]) for r in rows]).astype(np.int32)))


def test_compact_rows_are_smaller_and_rebuild_bit_for_bit(rows):
    full, compact = rows
    assert "input_features" not in compact[0]
    for f, c in zip(full, compact):
        assert c["num_windows"] == f["input_features"].shape[0]
        rebuilt = window_features(c)
        assert rebuilt.dtype == f["input_features"].dtype and rebuilt.shape == f["input_features"].shape
        assert np.array_equal(rebuilt.view(np.uint32), f["input_features"].view(np.uint32))
        for k in ("input_ids", "labels", "input_features_mask"):
            assert np.array_equal(c[k], f[k])
    kept = {s: c["sound_features"].shape[-1] for (s, _), c in zip(CLIPS, compact)}
    assert kept[10.0] < 1100 and kept[3.0] < 400 and kept[30.0] == 3000 and kept[40.0] == 3000
    assert kept[4.0] == 0  # silence: every frame is the window's constant


@pytest.mark.parametrize("order", [list(range(len(CLIPS))), [2, 3], [7, 1, 4], [5, 0]])
def test_collate_of_compact_rows_equals_collate_of_whole_windows(rows, processor, order):
    full, compact = rows
    pad = processor.tokenizer.pad_token_id
    want = collate([full[i] for i in order], pad)
    features, mask = _old_collate_audio([full[i] for i in order])
    assert torch.equal(want["input_features"], features) and torch.equal(want["input_features_mask"], mask)
    _assert_same(collate([compact[i] for i in order], pad), want)
    _assert_same(collate_prompts([compact[i] for i in order], pad), collate_prompts([full[i] for i in order], pad))
    mixed = [compact[i] if j % 2 else full[i] for j, i in enumerate(order)]  # rows of both kinds together
    _assert_same(collate(mixed, pad), want)


@pytest.mark.parametrize("order", [[2, 3], [1, 7, 8], [0, 1], [5, 2]])
def test_needed_frames_are_the_leading_frames_the_encoder_reads(rows, processor, order):
    from af3dist.model.encoder import frames_needed

    full, compact = rows
    pad = processor.tokenizer.pad_token_id
    whole = collate([full[i] for i in order], pad)
    keep = frames_needed(whole["input_features_mask"])
    got = collate([compact[i] for i in order], pad, frames="needed")
    assert got["input_features"].shape[-1] == keep
    for k in ("input_features", "input_features_mask"):
        assert torch.equal(got[k], whole[k][..., :keep].contiguous())
    assert frames_needed(got["input_features_mask"]) == keep  # the encoder cuts nothing more


def test_the_model_sees_the_same_through_needed_frames(rows, processor, tiny_model_dir):
    from af3dist.model.loading import load_model
    from af3dist.training.loss import label_loss_sum

    model = load_model(tiny_model_dir).eval()
    full, compact = rows
    pad = processor.tokenizer.pad_token_id
    for order in ([2, 3, 1], [5, 0, 7]):
        whole = collate([full[i] for i in order], pad)
        needed = collate([compact[i] for i in order], pad, frames="needed")
        with torch.no_grad():
            a = model(**{k: v for k, v in whole.items() if k != "labels"}).logits
            b = model(**{k: v for k, v in needed.items() if k != "labels"}).logits
            la, lb = label_loss_sum(model, whole)[0], label_loss_sum(model, needed)[0]
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_generation_rows_get_their_windows_back(rows):
    full, compact = rows
    row = with_window_features(compact[3])
    assert "sound_features" not in row and "sound_pad" not in row
    assert np.array_equal(row["input_features"], full[3]["input_features"])
    assert with_window_features(full[3]) is full[3]


def test_compact_windows_round_trip_any_values():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 50)).astype(np.float32)
    x[0, :, 20:] = -0.0
    x[1, :, 30:] = 0.0  # +0.0 and -0.0 are different bits: window 0's tail is not window 1's value
    x[2, :, 10:] = np.nan
    sound, pad = compact_windows(x)
    assert sound.shape == (3, 4, 30)
    assert np.array_equal(expand_windows(sound, pad, 50).view(np.uint32), x.view(np.uint32))
    x[2, 3, -1] = 1.0  # the last frame is not one value in every mel: nothing is cut
    sound, pad = compact_windows(x)
    assert sound.shape == x.shape
    assert np.array_equal(expand_windows(sound, pad, 50).view(np.uint32), x.view(np.uint32))
    empty, pad = compact_windows(np.zeros((0, 4, 50), np.float32))
    assert empty.shape == (0, 4, 0) and pad.shape == (0,)


def test_audio_inputs_refuses_an_unknown_frames_mode(rows):
    with pytest.raises(ValueError, match="frames"):
        audio_inputs(rows[1][:1], frames="sound")


def test_pools_are_cut_from_the_row_stream_whatever_the_blocks():
    from af3dist.data.batching import pools_of

    stream = np.arange(44)
    for sizes in ([44], [3, 7, 1, 20, 13], [1] * 44, [8, 8, 8, 8, 8, 4]):
        bounds = np.cumsum([0, *sizes])
        blocks = [{"i": stream[a:b], "j": -stream[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]
        pools = [[int(r["i"]) for r in pool] for pool in pools_of(blocks, 8)]
        assert pools == [list(range(k, min(k + 8, 44))) for k in range(0, 44, 8)]



def test_pools_grow_from_one_batch_to_the_full_pool_whatever_the_blocks():
    import itertools

    from af3dist.data.batching import pool_sizes, pools_of

    assert list(itertools.islice(pool_sizes(8, 16), 7)) == [8, 16, 32, 64, 128, 128, 128]
    assert list(itertools.islice(pool_sizes(8, 6), 5)) == [8, 16, 32, 48, 48]
    assert list(itertools.islice(pool_sizes(4, 1), 3)) == [4, 4, 4]
    stream = np.arange(100)
    for sizes in ([100], [3, 7, 1, 20, 13, 56], [1] * 100):
        bounds = np.cumsum([0, *sizes])
        blocks = [{"i": stream[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]
        pools = [[int(r["i"]) for r in pool] for pool in pools_of(blocks, pool_sizes(4, 8))]
        # 4, 8, 16, then 32 rows a pool, the last one the rest
        assert [len(p) for p in pools] == [4, 8, 16, 32, 32, 8]
        assert sum(pools, []) == list(range(100))

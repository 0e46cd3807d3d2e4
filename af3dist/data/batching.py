"""Length-aware batching and the training collate.

Rows arrive from Ray Data already featurized. A pool of several batches is sorted by
(audio windows, tokens) and cut into batches, so each batch holds similar lengths and little padding;
the batch order inside a pool is shuffled from a seed. The collate then only stacks and pads.

Log-mel windows travel compactly: a 30 s window of a 10 s clip is two thirds one constant (the value the
extractor gives silence, per window), so `build_dataset` rows carry `sound_features`, the window frames up
to the last one that differs from that constant, and `sound_pad`, the constant of each window, instead of
`input_features` (1.5 MB a window through Arrow, the object store and the consumer's copies, most of it
padding). `collate`, `collate_prompts` and `window_features` rebuild the windows bit for bit; rows made
elsewhere (`Featurizer` outputs, which carry `input_features`) are taken as they are.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import torch

from af3dist.data.features import IGNORE_INDEX

Row = dict[str, np.ndarray]
# "window": every clip's whole 30 s windows (the processor's layout, what the stock encoder reads);
# "needed": only the leading frames the padding-free encoder (SoundOnlyEncoder) reads for the batch.
Frames = Literal["window", "needed"]


def compact_windows(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(windows, mels, frames) log-mel windows -> (their leading frames up to the last frame, over all the
    windows, that is not bit for bit its window's constant tail value; each window's tail value).

    `expand_windows` inverts it exactly (bit for bit: compared as integers, so -0.0, NaN and every other
    value survive). A window whose last frame is not one value in every mel keeps all its frames."""
    n_windows, _, n_frames = features.shape
    if n_windows == 0 or n_frames == 0:
        return np.ascontiguousarray(features[..., :0]), np.zeros(n_windows, dtype=features.dtype)
    bits = features.view(f"u{features.dtype.itemsize}")
    pad_bits = bits[:, 0, -1]
    differs = (bits != pad_bits[:, None, None]).any(axis=1).any(axis=0)  # per frame, over mels and windows
    last = np.flatnonzero(differs)
    keep = int(last[-1]) + 1 if last.size else 0
    return np.ascontiguousarray(features[..., :keep]), features[:, 0, -1].copy()


def expand_windows(sound: np.ndarray, pad: np.ndarray, n_frames: int, out: np.ndarray | None = None) -> np.ndarray:
    """`compact_windows`' output -> the first `n_frames` frames of the windows it came from, written into
    `out` ((windows, mels, n_frames)) when given."""
    n_windows, n_mels, kept = sound.shape
    if out is None:
        out = np.empty((n_windows, n_mels, n_frames), dtype=sound.dtype)
    f = min(kept, n_frames)
    out[..., :f] = sound[..., :f]
    if f < n_frames:
        out[..., f:] = np.asarray(pad, dtype=out.dtype)[:, None, None]
    return out


def window_features(row: Row) -> np.ndarray:
    """A row's log-mel windows in the processor's layout (windows, mels, frames), from either form."""
    if "input_features" in row:
        return np.asarray(row["input_features"])
    mask = np.asarray(row["input_features_mask"])
    return expand_windows(np.asarray(row["sound_features"]), row["sound_pad"], mask.shape[-1])


def with_window_features(row: Row) -> Row:
    """The row with `input_features` in the processor's layout (for consumers that read it, such as the
    generation engine); a row that has it already is returned as is."""
    if "input_features" in row:
        return row
    out = {k: v for k, v in row.items() if k not in ("sound_features", "sound_pad")}
    out["input_features"] = window_features(row)
    return out


def audio_inputs(rows: list[Row], frames: Frames = "window") -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' windows one after another (input_features, float) and their masks (input_features_mask,
    int32): whole windows, or with `frames="needed"` the leading frames the padding-free encoder reads
    (`frames_needed` of the batch's mask), which it computes from exactly the same values."""
    masks = [np.asarray(r["input_features_mask"]) for r in rows]
    mask = np.concatenate(masks)
    n_frames = mask.shape[-1]
    if frames == "needed":
        from af3dist.model.encoder import frames_needed  # the model's rule (a lazy import: data workers skip it)

        n_frames = frames_needed(torch.from_numpy(mask))
    elif frames != "window":
        raise ValueError(f"frames must be 'window' or 'needed', not {frames!r}")
    sources = [np.asarray(r["input_features"] if "input_features" in r else r["sound_features"]) for r in rows]
    features = np.empty((len(mask), sources[0].shape[1], n_frames), dtype=np.result_type(*sources))
    start = 0
    for r, m, src in zip(rows, masks, sources):
        end = start + len(m)
        if "input_features" in r:
            features[start:end] = src[..., :n_frames]
        else:
            expand_windows(src, r["sound_pad"], n_frames, out=features[start:end])
        start = end
    return torch.from_numpy(features), torch.from_numpy(mask[:, :n_frames].astype(np.int32))


def rows_of(batch: dict[str, np.ndarray]) -> list[Row]:
    """Split a columnar batch (as Ray Data's iter_batches yields it) into rows."""
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def length_key(row: Row) -> tuple[int, int]:
    return int(row["num_windows"]), int(row["num_tokens"])


def cut_batches(pool: list[Row], batch_size: int, max_tokens: int | None = None) -> list[list[Row]]:
    """A length-sorted pool cut into batches of `batch_size` rows, or, with `max_tokens`, of as many rows
    (at most `batch_size`) as fit the budget once padded: rows x the longest row's tokens (its `<sound>`
    tokens included, so a 30 s clip costs three times a 10 s one)."""
    if not max_tokens:
        return [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
    batches: list[list[Row]] = []
    current: list[Row] = []
    longest = 0
    for row in pool:
        n = int(row["num_tokens"])
        if current and (len(current) >= batch_size or max(longest, n) * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def bucket_batches(pools: Iterable[list[Row]], batch_size: int, seed: int,
                   max_tokens: int | None = None) -> Iterator[list[Row]]:
    """Sort each pool by length, cut it into batches (`cut_batches`), yield them in a seeded random order."""
    rng = random.Random(seed)
    for pool in pools:
        batches = cut_batches(sorted(pool, key=length_key), batch_size, max_tokens)
        rng.shuffle(batches)
        yield from batches


def pool_sizes(batch_size: int, pool_batches: int) -> Iterator[int]:
    """Rows per pool: one batch first, doubling up to `pool_batches` batches, which every later pool holds.
    The first batch of a stream waits for one batch of rows instead of a whole pool (a pool of 16 batches of
    8 clips is 128 decodes); only the first few batches of a stream are bucketed from fewer rows."""
    size = batch_size
    while size < batch_size * pool_batches:
        yield size
        size *= 2
    while True:
        yield batch_size * pool_batches


def pools_of(batches: Iterable[dict[str, np.ndarray]], sizes: int | Iterable[int]) -> Iterator[list[Row]]:
    """Rows from columnar batches of any sizes, regrouped into pools of `sizes` rows (one size for every pool,
    or one per pool in turn) in stream order, the last one holding the rest: the same pools whatever the block
    boundaries."""
    sizes = iter(itertools.repeat(sizes) if isinstance(sizes, int) else sizes)
    pool: list[Row] = []
    size = next(sizes)
    for batch in batches:
        rows = rows_of(batch)
        while rows:
            take = size - len(pool)
            pool.extend(rows[:take])
            rows = rows[take:]
            if len(pool) == size:
                yield pool
                pool, size = [], next(sizes)
    if pool:
        yield pool


def iter_bucketed(dataset_iter, batch_size: int, pool_batches: int, seed: int, prefetch_batches: int = 2,
                  max_tokens: int | None = None) -> Iterator[list[Row]]:
    """Batches of rows from a Ray Data DataIterator or Dataset, length-bucketed within pools of up to
    batch_size x pool_batches rows (`pool_sizes`: the first pools of a stream are smaller, so its first batch
    comes after one batch of clips). The pools, and so the batches, are the same on every pass over the same
    stream: resume counts batches.

    Pools are cut from Ray Data's blocks as they come (`iter_batches(batch_size=None)`): no copy of the rows
    into new blocks and no more fetches than blocks. Ray hands a block on once the `prefetch_batches` blocks
    after it are ready too, so how early the first rows arrive rests on the blocks' size (`data.block_mb`).
    (An earlier measurement that growing pools cost the trainer samples/s was Ray killing idle data workers
    at random pauses, see af3dist.cluster.IDLE_WORKERS_KEPT, not the pools.)"""
    blocks = dataset_iter.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch_batches)
    return bucket_batches(pools_of(blocks, pool_sizes(batch_size, pool_batches)), batch_size, seed, max_tokens)


def collate(rows: list[Row], pad_token_id: int, frames: Frames = "window") -> dict[str, torch.Tensor]:
    """Right-pad token sequences; concatenate every clip's 30 s log-mel windows (the processor's layout), or
    with `frames="needed"` only their frames that a padding-free encoder reads (`audio_inputs`)."""
    longest = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.from_numpy(np.asarray(r["input_ids"], dtype=np.int64))
        labels[i, :n] = torch.from_numpy(np.asarray(r["labels"], dtype=np.int64))
        attention_mask[i, :n] = 1
    features, features_mask = audio_inputs(rows, frames)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "input_features": features, "input_features_mask": features_mask}


def collate_prompts(rows: list[Row], pad_token_id: int, frames: Frames = "window") -> dict[str, torch.Tensor]:
    """Generation inputs: each row's prompt (everything before its labelled caption, or all of input_ids
    when the row has no labels), LEFT-padded as generation needs, with the rows' audio windows (`frames` as
    in `collate`)."""
    prompts = []
    for r in rows:
        ids = np.asarray(r["input_ids"], dtype=np.int64)
        labels = np.asarray(r["labels"]) if "labels" in r else np.full(len(ids), IGNORE_INDEX)
        start = int(np.argmax(labels != IGNORE_INDEX)) if (labels != IGNORE_INDEX).any() else len(ids)
        prompts.append(ids[:start])
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p):] = torch.from_numpy(p)
        attention_mask[i, longest - len(p):] = 1
    features, features_mask = audio_inputs(rows, frames)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "input_features": features, "input_features_mask": features_mask}

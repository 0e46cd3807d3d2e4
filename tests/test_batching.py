"""Pools for length bucketing: small first, so the first step does not wait for a whole pool."""

import numpy as np

from af3dist.data.batching import bucket_batches, growing_pools


def _batches(n_rows: int, size: int):
    for start in range(0, n_rows, size):
        ids = np.arange(start, min(start + size, n_rows))
        yield {"id": ids, "num_tokens": 100 + ids % 7, "num_windows": np.ones_like(ids)}


def test_pools_start_at_one_batch_and_double_up_to_the_pool_size():
    pools = list(growing_pools(_batches(1000, 8), batch_size=8, pool_batches=16))
    assert [len(p) for p in pools][:6] == [8, 16, 32, 64, 128, 128]
    assert sum(len(p) for p in pools) == 1000
    assert [int(r["id"]) for p in pools for r in p] == list(range(1000))  # nothing lost, nothing reordered


def test_the_batch_stream_is_the_same_every_time():
    def stream():
        pools = growing_pools(_batches(300, 8), batch_size=8, pool_batches=4)
        return [[int(r["id"]) for r in b] for b in bucket_batches(pools, 8, seed=3)]

    first = stream()
    assert first == stream()
    assert sorted(i for b in first for i in b) == list(range(300))

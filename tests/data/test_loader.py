import math

import numpy as np
import pytest
import torch

from aoe.data import (BatchSampler, DataError, bits_per_byte, iter_eval_batches, num_eval_windows, unigram_cross_entropy,
                      unigram_entropy)

TOKENS = np.arange(10_000, dtype=np.uint16) % 1000


def test_batch_shapes_and_shift():
    s = BatchSampler(TOKENS, batch_size=8, seq_len=16, seed=1)
    x, y = next(s)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # windows are consecutive runs of TOKENS (= arange % 1000)
    assert torch.equal(x[:, 1:], (x[:, :-1] + 1) % 1000) and torch.equal(y, (x + 1) % 1000)


def test_deterministic_and_seed_dependent():
    a = BatchSampler(TOKENS, 4, 32, seed=7)
    b = BatchSampler(TOKENS, 4, 32, seed=7)
    c = BatchSampler(TOKENS, 4, 32, seed=8)
    for _ in range(3):
        xa, _ = next(a)
        xb, _ = next(b)
        xc, _ = next(c)
        assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])


def test_resume_from_state():
    a = BatchSampler(TOKENS, 4, 32, seed=3)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    assert state == {"seed": 3, "step": 5}
    b = BatchSampler(TOKENS, 4, 32, seed=0)
    b.load_state_dict(state)
    for step in range(5, 9):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(b.batch(step)[0], xb)  # batch(step) is the batch iteration gives at that step
    with pytest.raises(DataError, match="step must be a non-negative int, got -1"):
        b.load_state_dict({"seed": 0, "step": -1})


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_ranks_partition_global_batch(world_size):
    single = BatchSampler(TOKENS, 8, 16, seed=5)
    ranks = [BatchSampler(TOKENS, 8, 16, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for step in range(4):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert all(p[0].shape == (8 // world_size, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_sampler_errors():
    with pytest.raises(DataError, match="batch_size=6 is not divisible by world_size=4"):
        BatchSampler(TOKENS, 6, 16, seed=0, rank=0, world_size=4)
    with pytest.raises(DataError, match="rank=2 is not in"):
        BatchSampler(TOKENS, 4, 16, seed=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="10 tokens are too few for one window of seq_len=10"):
        BatchSampler(np.arange(10), 4, 10, seed=0)
    with pytest.raises(DataError, match="must be a 1-D array"):
        BatchSampler(np.zeros((4, 100)), 4, 10, seed=0)


def test_eval_batches_cover_tokens():
    tokens = np.arange(1003, dtype=np.uint16)
    seq_len = 10
    batches = list(iter_eval_batches(tokens, batch_size=16, seq_len=seq_len))
    k = num_eval_windows(len(tokens), seq_len)
    assert k == 100 and len(batches) == 7 and batches[-1][0].shape == (4, 10)
    xs = torch.cat([x for x, _ in batches]).flatten().numpy()
    ys = torch.cat([y for _, y in batches]).flatten().numpy()
    assert np.array_equal(xs, tokens[:k * seq_len]) and np.array_equal(ys, tokens[1:k * seq_len + 1])
    assert len(list(iter_eval_batches(tokens, 16, seq_len, max_batches=3))) == 3
    # ranks take alternate batches, together exactly the single-process batches
    r0 = list(iter_eval_batches(tokens, 16, seq_len, rank=0, world_size=2))
    r1 = list(iter_eval_batches(tokens, 16, seq_len, rank=1, world_size=2))
    merged = [b for pair in zip(r0, r1 + [None]) for b in pair if b is not None]
    assert len(merged) == 7 and all(torch.equal(a[0], b[0]) for a, b in zip(merged, batches))
    with pytest.raises(DataError, match="too few"):
        list(iter_eval_batches(tokens[:5], 2, 10))


def test_unigram_entropy_and_bpb():
    assert unigram_entropy(np.array([3, 3, 3])) == 0.0
    assert unigram_entropy(np.array([0, 1, 2, 3] * 50, dtype=np.uint16)) == pytest.approx(math.log(4))
    train = np.array([0, 0, 1, 2] * 100)
    h = unigram_entropy(train)
    ce = unigram_cross_entropy(train, train, vocab_size=4, alpha=1e-9)
    assert ce == pytest.approx(h, rel=1e-6)
    assert unigram_cross_entropy(train, np.array([3, 3]), vocab_size=4) > math.log(4)  # unseen id is expensive
    assert bits_per_byte(math.log(2) * 3, 3.0) == pytest.approx(1.0)

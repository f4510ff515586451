"""The bucket batch sampler: one shape per batch, disjoint shards, repeats, remainders, exact resume."""

from __future__ import annotations

from collections import Counter

import pytest

from bucketing.sampler import BucketBatchSampler

# 9 + 7 + 5 rows in three buckets: with batch 2 and 2 processes every bucket leaves a remainder.
BUCKETS = [(64, 64)] * 9 + [(64, 128)] * 7 + [(128, 64)] * 5


def epoch_of(sampler_args, epoch, num_replicas=1, **kwargs):
    """Each process's batches for `epoch`."""
    out = []
    for rank in range(num_replicas):
        sampler = BucketBatchSampler(*sampler_args, num_replicas=num_replicas, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_one_process_sees_every_row_once_in_batches_of_one_bucket():
    [batches] = epoch_of((BUCKETS, 4, 0), 0)
    assert all(len({BUCKETS[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(BUCKETS)))
    # carry: each bucket's remainder is one smaller batch (9 = 4+4+1, 7 = 4+3, 5 = 4+1)
    assert sorted(len(b) for b in batches) == [1, 1, 3, 4, 4, 4, 4]


def test_two_processes_get_disjoint_batches_of_one_shape_in_step():
    buckets = [(64, 64)] * 10 + [(64, 128)] * 7 + [(128, 64)] * 6  # remainders 2, 3, 2 of steps of 4
    rank0, rank1 = epoch_of((buckets, 2, 7), 3, num_replicas=2)
    assert len(rank0) == len(rank1) == 3 + 2 + 2  # DDP steps together
    for a, b in zip(rank0, rank1):
        assert len({buckets[i] for i in a + b}) == 1  # same shape on both processes at every step
        assert not set(a) & set(b)
    seen = Counter(i for batch in rank0 + rank1 for i in batch)
    assert sorted(seen) == list(range(len(buckets))) and set(seen.values()) == {1}  # none lost, none twice
    assert sorted(len(b) for b in rank0 + rank1) == [1] * 5 + [2] * 9  # remainders: 2 -> 1+1, 3 -> 2+1


def test_fewer_leftover_rows_than_processes_are_padded_like_distributed_sampler():
    buckets = [(64, 64)] * 5  # batch 2 x 2 processes: one full step, then 1 row for 2 processes
    rank0, rank1 = epoch_of((buckets, 2, 0), 0, num_replicas=2)
    assert [len(b) for b in rank0] == [len(b) for b in rank1] and len(rank0) == 2
    seen = Counter(i for batch in rank0 + rank1 for i in batch)
    assert sorted(seen) == list(range(5)) and sum(seen.values()) == 6  # every row, one repeated once


def test_drop_keeps_only_full_batches():
    [batches] = epoch_of((BUCKETS, 4, 0), 0, remainder="drop")
    assert sorted(len(b) for b in batches) == [4] * 4  # 9 -> 2 batches, 7 -> 1, 5 -> 1
    rank0, rank1 = epoch_of((BUCKETS, 2, 0), 0, num_replicas=2, remainder="drop")
    assert all(len(b) == 2 for b in rank0 + rank1) and len(rank0) == len(rank1) == 4  # 9->2, 7->1, 5->1 steps


def test_repeats_are_honoured():
    repeats = [3] + [1] * 8 + [2] * 7 + [1] * 5
    [batches] = epoch_of((BUCKETS, 3, 0), 0, repeats=repeats)
    seen = Counter(i for b in batches for i in b)
    assert seen == Counter({i: r for i, r in enumerate(repeats)})
    [none] = epoch_of(([(64, 64)] * 3, 2, 0), 0, repeats=[0, 0, 0])
    assert none == []


def test_deterministic_per_seed_and_different_per_epoch():
    assert epoch_of((BUCKETS, 2, 5), 1) == epoch_of((BUCKETS, 2, 5), 1)
    assert epoch_of((BUCKETS, 2, 5), 1) != epoch_of((BUCKETS, 2, 5), 2)
    assert epoch_of((BUCKETS, 2, 5), 1) != epoch_of((BUCKETS, 2, 6), 1)


def test_resume_sees_exactly_the_remaining_batches():
    sampler = BucketBatchSampler(BUCKETS, 2, seed=3, num_replicas=2, rank=1)
    sampler.set_epoch(4)
    order = list(sampler)
    interrupted = BucketBatchSampler(BUCKETS, 2, seed=3, num_replicas=2, rank=1)
    interrupted.set_epoch(4)
    taken = [batch for _, batch in zip(range(3), interrupted)]
    state = interrupted.state_dict()
    assert state == {"epoch": 4, "batch_index": 3} and taken == order[:3]
    resumed = BucketBatchSampler(BUCKETS, 2, seed=3, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    assert list(resumed) == order[3:]
    resumed.set_epoch(4)  # the same epoch again keeps the position: nothing left
    assert list(resumed) == []
    resumed.set_epoch(5)
    assert len(resumed) == len(list(resumed)) == len(order)  # 9, 7, 5 rows in steps of 4: 3 + 2 + 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="remainder"):
        BucketBatchSampler(BUCKETS, 2, 0, remainder="pad")
    with pytest.raises(ValueError, match="rank 2"):
        BucketBatchSampler(BUCKETS, 2, 0, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="repeats"):
        BucketBatchSampler(BUCKETS, 2, 0, repeats=[1])


def test_subset_weights_split_each_epoch_by_count():
    from collections import Counter

    from bucketing.sampler import draw_counts

    # A 20-image subject and a 2,000-image style folder, weighted 1:1: an epoch keeps its 2,020 draws.
    groups = [0] * 20 + [1] * 2000
    sampler = BucketBatchSampler([(64, 64)] * 2020, batch_size=4, seed=5, groups=groups,
                                 group_weights={0: 1.0, 1: 1.0})
    for epoch in (0, 1):
        counts = sampler.epoch_counts(epoch)
        assert sum(counts[:20]) == 1010 and sum(counts[20:]) == 1010
        assert set(counts[:20]) == {50, 51}  # whole passes, then a seeded partial one
        assert set(counts[20:]) == {0, 1}
        drawn = Counter(groups[r] for step in sampler.epoch_steps(epoch) for batch in step for r in batch)
        assert drawn == {0: 1010, 1: 1010}
    assert sampler.epoch_counts(0) != sampler.epoch_counts(1)  # other style images next epoch
    again = BucketBatchSampler([(64, 64)] * 2020, batch_size=4, seed=5, groups=groups, group_weights={0: 1.0, 1: 1.0})
    assert again.epoch_steps(1) == sampler.epoch_steps(1)  # deterministic by seed
    assert draw_counts(10, [1, 1, 1]) == [4, 3, 3] and draw_counts(7, [3, 1]) == [5, 2]


def test_per_row_batch_sizes_keep_one_shape_per_batch_and_resume_exactly():
    buckets = [(32, 32)] * 10 + [(64, 64)] * 5
    sizes = [4] * 10 + [2] * 5
    sampler = BucketBatchSampler(buckets, batch_size=1, seed=2, batch_sizes=sizes, remainder="drop")
    batches = list(sampler)
    assert sorted(len(b) for b in batches) == [2, 2, 4, 4]
    assert all(len({buckets[r] for r in b}) == 1 and len(b) == sizes[b[0]] for b in batches)
    resumed = BucketBatchSampler(buckets, batch_size=1, seed=2, batch_sizes=sizes, remainder="drop")
    resumed.load_state_dict({"epoch": 0, "batch_index": 2})
    assert list(resumed) == batches[2:]


def test_rows_in_step_place_each_process_in_the_step_batch():
    buckets = [(64, 64)] * 7  # batch 2 x 2 processes: one full step, then 3 rows cut 2 + 1
    samplers = [BucketBatchSampler(buckets, 2, seed=0, num_replicas=2, rank=r) for r in range(2)]
    sizes = [[len(b) for b in s] for s in samplers]
    for index in range(len(samplers[0])):
        (offset0, total0), (offset1, total1) = (s.rows_in_step(index) for s in samplers)
        assert offset0 == 0 and offset1 == sizes[0][index] and total0 == total1 == sizes[0][index] + sizes[1][index]
    assert sorted(a + b for a, b in zip(*sizes)) == [3, 4]  # a full step and the 2 + 1 remainder

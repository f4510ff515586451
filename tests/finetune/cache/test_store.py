"""finetune/cache/store.py: shards round-trip, are checked on open, and unfinished builds are found."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.cache.store import CacheError, CacheStats, ShardReader, ShardWriter, scan_shards, write_index


def _write(cache_dir, n, shard_size):
    writer = ShardWriter(cache_dir, "t-run-r0", shard_size)
    entries = {f"k{i}": {"a": torch.full((2, 3), float(i)), "b": torch.arange(i + 1)} for i in range(n)}
    for key, tensors in entries.items():
        writer.add(key, tensors)
    writer.flush()
    return entries


def test_roundtrip_through_index(tmp_path):
    entries = _write(tmp_path, 5, shard_size=2)
    records, invalid = scan_shards(tmp_path)
    assert len(records) == 3 and invalid == []
    assert sorted(k for r in records.values() for k in r["entries"]) == sorted(entries)
    write_index(tmp_path, records, kind="test")
    assert not list(tmp_path.glob("*.safetensors.json"))  # records moved into the index
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["kind"] == "test" and all({"bytes", "sha256", "entries"} <= set(r) for r in index["shards"].values())
    reader = ShardReader(tmp_path)
    assert len(reader) == 5
    for key, tensors in entries.items():
        got = reader.get(key)
        assert set(got) == {"a", "b"} and all(torch.equal(got[f], tensors[f]) for f in tensors)


def test_shards_appear_as_they_fill(tmp_path):
    writer = ShardWriter(tmp_path, "t-run-r0", shard_size=2)
    writer.add("a", {"x": torch.zeros(1)})
    assert not list(tmp_path.glob("*.safetensors"))
    writer.add("b", {"x": torch.zeros(1)})
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # written (with its record) before the build ends
    assert len(list(tmp_path.glob("*.safetensors.json"))) == 1


def test_disk_full_is_a_clear_error_and_the_shards_written_before_stay_usable(tmp_path, monkeypatch):
    import errno

    import finetune.cache.store as store

    writer = ShardWriter(tmp_path, "t-run-r0", shard_size=1)
    writer.add("a", {"x": torch.zeros(1)})  # the first shard is written

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "save_file", full)
    with pytest.raises(CacheError, match=r"disk full.*1 shard\(s\) already written are kept.*cache.dir"):
        writer.add("b", {"x": torch.ones(1)})
    records, invalid = scan_shards(tmp_path)
    assert [list(r["entries"]) for r in records.values()] == [["a"]] and invalid == []


def test_missing_shard_is_invalid_and_reader_refuses(tmp_path):
    _write(tmp_path, 4, shard_size=2)
    records, _ = scan_shards(tmp_path)
    write_index(tmp_path, records)
    victim = sorted(records)[0]
    (tmp_path / victim).unlink()
    records, invalid = scan_shards(tmp_path)
    assert invalid == [victim] and len(records) == 1
    with pytest.raises(CacheError, match="missing or damaged"):
        ShardReader(tmp_path)


def test_unreadable_record_is_treated_as_damaged(tmp_path):
    _write(tmp_path, 2, shard_size=2)
    record = next(tmp_path.glob("*.safetensors.json"))
    record.write_text("{not json")
    records, invalid = scan_shards(tmp_path)
    assert records == {} and len(invalid) == 1


def test_no_index_is_a_clear_error(tmp_path):
    with pytest.raises(CacheError, match="finetune cache"):
        ShardReader(tmp_path)


def test_cache_stats():
    stats = CacheStats("latents", encoded=6, reused=2, seconds=3.0)
    assert str(stats) == "latents: 6 encoded, 2 reused"
    assert stats.items_per_second == 2.0
    assert CacheStats("text", 0, 5).items_per_second == 0.0

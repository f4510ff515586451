"""finetune/cache/build.py: several processes split the work and the main one writes the merged index."""

from __future__ import annotations

import threading

import torch

from finetune.cache import LatentCache, build_latent_cache, latent_keys_for_manifest
from finetune.cache.build import run_build


class FakeAccelerator:
    """The part of `accelerate.Accelerator` the build uses; processes are threads sharing a barrier."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.barrier = rank, world, barrier

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=60)


def _run_processes(world, target):
    barrier, results, errors = threading.Barrier(world), {}, []

    def run(rank):
        try:
            results[rank] = target(FakeAccelerator(rank, world, barrier))
        except BaseException as err:  # surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_processes_encode_disjoint_shares(tmp_path):
    seen: dict[int, list[str]] = {}

    def target(acc):
        def encode(keys):
            seen[acc.process_index] = keys
            for key in keys:
                yield key, {"x": torch.tensor([float(len(key))])}

        return run_build("test", tmp_path, [f"k{i}" for i in range(7)], encode, accelerator=acc,
                         shard_size=2, progress=False)

    results = _run_processes(3, target)
    shares = [set(seen[r]) for r in range(3)]
    assert sorted(len(s) for s in shares) == [2, 2, 3]
    assert set.union(*shares) == {f"k{i}" for i in range(7)} and sum(map(len, shares)) == 7
    assert all(str(s) == "test: 7 encoded, 0 reused" for s in results.values())
    assert list(tmp_path.glob("*.json")) == [tmp_path / "index.json"]


def test_latent_cache_under_two_processes(tmp_path, images, make_vae, make_manifest):
    vae, manifest = make_vae(), make_manifest(images)
    _run_processes(2, lambda acc: build_latent_cache(manifest, vae, tmp_path, accelerator=acc, progress=False))
    assert {p.name.split("-")[2] for p in tmp_path.glob("*.safetensors")} == {"r0", "r1"}
    cache = LatentCache(tmp_path)
    assert all(key in cache for key in latent_keys_for_manifest(manifest, vae))
    assert build_latent_cache(manifest, vae, tmp_path, progress=False).reused == 4


def test_nothing_to_encode_draws_no_progress_bar(tmp_path, capsys):
    from finetune.cache.build import run_build

    def encode(keys):
        yield from ((key, {"x": torch.zeros(1)}) for key in keys)

    run_build("latents", tmp_path, ["a", "b"], encode, progress=True)
    capsys.readouterr()
    stats = run_build("latents", tmp_path, ["a", "b"], encode, progress=True)  # all cached now
    assert stats.encoded == 0 and stats.reused == 2
    assert "caching" not in capsys.readouterr().err

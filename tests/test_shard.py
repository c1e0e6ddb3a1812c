"""circot.shard: the shard plan, shard files and rank 0's merge, used by sharded `circot eval` and
`circot index build` (ranks run one after the other in this process; the two-process runs are slow tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from circot.errors import CircotError
from circot.shard import (
    ShardPlan,
    compute_shard,
    distributed_context,
    file_identity,
    gather,
    read_shard,
    remove_shards,
)
from retrieval_fakes import shapes_tiny_model, small_world, write_images


def _plan(tmp_path, rank, items, fingerprint="fp-1", world=3, settings=None):
    return ShardPlan.make("gallery", fingerprint, items, tmp_path / "work", rank, world, settings)


def test_shards_merge_in_rank_order_and_are_reused(tmp_path):
    items = [f"item-{i}" for i in range(7)]
    rows = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)
    assert [_plan(tmp_path, r, items).bounds() for r in range(3)] == [(0, 2), (2, 4), (4, 7)]
    calls = []

    def work(rank):
        def compute():
            calls.append(rank)
            s, e = _plan(tmp_path, rank, items).bounds()
            return rows[s:e], [f"extra-{i}" for i in range(s, e)], {"rank": rank}

        return compute

    for rank in (2, 1):  # other ranks first, as other processes would
        assert compute_shard(_plan(tmp_path, rank, items), work(rank)) is False
        assert gather(_plan(tmp_path, rank, items)) is None  # only rank 0 merges
    plan0 = _plan(tmp_path, 0, items)
    with pytest.raises(CircotError, match="timed out.*gallery-.*-00000-of-00003"):
        gather(plan0, timeout=0.2, poll=0.05)  # rank 0's own shard is missing
    compute_shard(plan0, work(0))
    merged = gather(plan0, timeout=5)
    np.testing.assert_array_equal(merged.vectors, rows)
    assert merged.extras == [f"extra-{i}" for i in range(7)]
    assert merged.info == {"shards": [{"rank": 0}, {"rank": 1}, {"rank": 2}]}
    assert calls == [2, 1, 0]

    # a rerun reuses every shard: nothing is computed again
    for rank in range(3):
        assert compute_shard(_plan(tmp_path, rank, items), work(rank)) is True
    assert calls == [2, 1, 0]

    # another model, another input list, other settings or world size: other shard files, never these
    for other in (
        _plan(tmp_path, 1, items, fingerprint="fp-2"),
        _plan(tmp_path, 1, [*items[:-1], "item-x"]),
        _plan(tmp_path, 1, items, settings={"mode": "fast"}),
        _plan(tmp_path, 1, items, world=2),
    ):
        assert other.file() != _plan(tmp_path, 1, items).file() and read_shard(other) is None
        start, end = other.bounds()
        assert compute_shard(other, lambda n=end - start: (rows[:n], None, None)) is False

    remove_shards(plan0)
    assert not any(f.exists() for f in plan0.files())


def test_a_shard_of_other_contents_is_recomputed(tmp_path):
    items = ["a", "b", "c", "d"]
    plan = _plan(tmp_path, 1, items, world=2)
    vec = np.ones((2, 3), np.float32)
    compute_shard(plan, lambda: (vec, None, None), keys=["hash-c", "hash-d"])
    assert read_shard(plan, keys=["hash-c", "hash-d"]) is not None
    # same paths, new image contents: the stored content keys differ, so the shard is computed again
    assert compute_shard(plan, lambda: (2 * vec, None, None), keys=["hash-c2", "hash-d"]) is False
    np.testing.assert_array_equal(read_shard(plan).vectors, 2 * vec)
    # a damaged or foreign file under the shard's name is not used
    plan.file().write_bytes(b"not a shard")
    assert read_shard(plan) is None
    other = _plan(tmp_path, 1, items, world=2, fingerprint="fp-2")
    compute_shard(other, lambda: (vec, None, None))
    os.replace(other.file(), plan.file())
    assert read_shard(plan) is None


def test_file_identity_changes_with_the_file(tmp_path):
    (p,) = write_images(tmp_path, 1)
    before = file_identity(p)
    write_images(tmp_path, 1, size=9)  # same name, new contents
    assert file_identity(p) != before and file_identity(p)[0] == str(p)
    with pytest.raises(CircotError, match="cannot read"):
        file_identity(tmp_path / "missing.png")


def test_rank_from_the_launchers_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed_context() == (0, 1)
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", "3")
    assert distributed_context() == (3, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(CircotError, match="RANK=2 / WORLD_SIZE=2"):
        distributed_context()


# --------------------------------------------------------------------------------------------- sharded eval
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("shapes") / "w", n_val=7)


@pytest.fixture(scope="module")
def model():
    return shapes_tiny_model()


class _Counting:
    """Counts the images and queries a model embeds (instance attributes shadow its methods)."""

    def __init__(self, model):
        self.model, self.images, self.queries = model, 0, 0
        original_images, original_queries = model.encode_images, model.encode_queries

        def encode_images(images, *args, **kwargs):
            self.images += len(images)
            return original_images(images, *args, **kwargs)

        def encode_queries(images, *args, **kwargs):
            self.queries += len(images)
            return original_queries(images, *args, **kwargs)

        model.encode_images, model.encode_queries = encode_images, encode_queries

    def close(self):
        del self.model.encode_images, self.model.encode_queries


def test_sharded_evaluate_equals_one_process_and_resumes(world, model, tmp_path):
    from circot.data.shapes import load
    from circot.evaluate import evaluate_split

    split = load(world, "val")
    one = evaluate_split(model, split, mode="full", use_cache=False, keep_scores=True, rank=0, world_size=1)
    work = tmp_path / "work"
    counter = _Counting(model)
    try:
        kw = dict(mode="full", use_cache=False, keep_scores=True, world_size=2, work_dir=work)
        assert evaluate_split(model, split, rank=1, **kw) is None  # rank 1 only writes its shards
        n_gallery = len(split.gallery.ids)
        assert (counter.images, counter.queries) == (n_gallery - n_gallery // 2, 7 - 7 // 2)
        assert len(list(work.glob("*.npz"))) == 2
        # rank 1 again (a rerun after a crash): its shards are reused, nothing is embedded
        assert evaluate_split(model, split, rank=1, **kw) is None
        assert (counter.images, counter.queries) == (n_gallery - n_gallery // 2, 7 - 7 // 2)
        two = evaluate_split(model, split, rank=0, timeout=10, **kw)
        assert (counter.images, counter.queries) == (n_gallery, 7)  # rank 0 embedded the other halves
    finally:
        counter.close()
    assert two.metrics.metrics == one.metrics.metrics and two.cot_scores == one.cot_scores
    np.testing.assert_allclose(two.scores, one.scores, atol=1e-5)
    assert [c.conclusion for c in two.cots] == [c.conclusion for c in one.cots]
    assert [c.token_ids for c in two.cots] == [c.token_ids for c in one.cots]
    assert two.cache == {"shards": 2, "cot_cached": 0, "cot_generated": 7}
    assert not work.exists()  # shard files removed once merged


@pytest.mark.parametrize(
    "setting,value", [("fast_weight", 0.3), ("cot_samples", 1), ("cot_choice", "gallery")]
)
def test_query_shards_are_not_reused_across_query_settings(world, model, tmp_path, setting, value):
    """fast_weight and cot_samples change full mode's query embeddings, and cot_choice what its shards keep, but
    not the fingerprint: the query shard is redone, the gallery shard reused."""
    from circot.data.shapes import load
    from circot.evaluate import evaluate_split

    split = load(world, "val")
    kw = dict(mode="full", use_cache=False, world_size=2, work_dir=tmp_path / "work")
    counter = _Counting(model)
    default = getattr(model.config, setting)
    try:
        assert evaluate_split(model, split, rank=1, **kw) is None
        first = (counter.images, counter.queries)
        setattr(model.config, setting, value)
        assert evaluate_split(model, split, rank=1, **kw) is None
        assert (counter.images, counter.queries) == (first[0], 2 * first[1])
    finally:
        setattr(model.config, setting, default)
        counter.close()


# --------------------------------------------------------------------------------------------- two processes
def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_two_processes_eval_and_index_build_equal_one_process(world, model, tmp_path, cli):
    """`torchrun --nproc_per_node 2 -m circot eval / index build` (two CPU processes) give the metrics and
    the index of one process."""
    from circot.index import GalleryIndex

    model_dir = tmp_path / "m"
    model.save_pretrained(model_dir)
    common = ["--dataset", "shapes", "--root", str(world), "--split", "val", "--model", str(model_dir)]
    code, _, err = cli("eval", *common, "--json", tmp_path / "one.json", "--no-cache", "--device", "cpu")
    assert code == 0, err
    proc = subprocess.run(
        _torchrun("-m", "circot", "eval", *common, "--json", str(tmp_path / "two.json"), "--cache",
                  str(tmp_path / "cache"), "--device", "cpu"),
        capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["metrics"] == one["metrics"] and two["cot_scores"] == one["cot_scores"]
    assert two["cots"] == one["cots"] and two["cache"]["shards"] == 2
    assert proc.stdout.count(", full mode") == 1  # only rank 0 reports

    images = world / "images"
    code, _, err = cli("index", "build", "--images", images, "--out", tmp_path / "ix1", "--model", model_dir,
                       "--no-cache", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    proc = subprocess.run(
        _torchrun("-m", "circot", "index", "build", "--images", str(images), "--out", str(tmp_path / "ix2"),
                  "--model", str(model_dir), "--no-cache", "--device", "cpu"),
        capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = GalleryIndex.load(tmp_path / "ix1"), GalleryIndex.load(tmp_path / "ix2")
    assert a.ids == b.ids and a.paths == b.paths and len(a) > 10
    np.testing.assert_allclose(a.vectors(), b.vectors(), atol=1e-5)
    assert not (tmp_path / ".ix2.shards").exists()


def test_sharded_build_keeps_the_reasons_of_skipped_images(tmp_path, monkeypatch):
    """An image that rank 1 could not read is left out of rank 0's index with rank 1's reason."""
    from circot.gallery import build_index
    from retrieval_fakes import FakeEncoder

    class Strict(FakeEncoder):
        def encode_images(self, images, batch_size=32, show_progress_bar=False):
            from PIL import Image

            for p in images:
                Image.open(p).load()
            return super().encode_images(images)

    write_images(tmp_path / "g", 6)
    (tmp_path / "g" / "zz-bad.png").write_bytes(b"not an image")  # sorts last: in rank 1's shard
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    kw = dict(use_cache=False, skip_bad=True)
    assert build_index(Strict(), tmp_path / "g", tmp_path / "ix", **kw) is None
    monkeypatch.setenv("RANK", "0")
    index = build_index(Strict(), tmp_path / "g", tmp_path / "ix", **kw)
    assert len(index) == 6 and "zz-bad.png" not in index
    (reason,) = index.skipped.values()
    assert "cannot identify image file" in reason
    report = json.loads((tmp_path / "ix" / "skipped.json").read_text())
    assert [r["id"] for r in report] == ["zz-bad.png"] and report[0]["reason"] == reason


def test_sharded_build_without_out_folder(tmp_path, monkeypatch):
    """Without an index folder the ranks still meet in one work folder (named after the image list)."""
    from circot.gallery import build_index, list_images
    from retrieval_fakes import FakeEncoder

    write_images(tmp_path / "g", 5)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(os, "getpid", lambda r=rank: 4000 + int(r))  # ranks are other processes
        index = build_index(FakeEncoder(), tmp_path / "g", cache_dir=tmp_path / "cache")
        if rank == "1":
            (work,) = (tmp_path / "cache" / "work").iterdir()
            assert "4001" not in work.name and len(list(work.glob("gallery-*.npz"))) == 1
    np.testing.assert_allclose(
        index.vectors(), FakeEncoder().encode_images(list_images(tmp_path / "g")[1]), atol=1e-6
    )
    assert not any((tmp_path / "cache" / "work").iterdir())

from __future__ import annotations

import json

import numpy as np
import pytest

from circot.errors import CircotError
from circot.index import GalleryIndex, brute_force_search, read_manifest


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(n=50, d=16, factory="Flat", seed=0):
    idx = GalleryIndex.create(d, "fp-test", factory=factory, model="some/model")
    x = unit(n, d, seed)
    idx.train(x)
    idx.add(x, [f"id{i}" for i in range(n)], [f"/img/{i}.png" for i in range(n)])
    return idx, x


def test_search_equals_numpy_brute_force():
    idx, x = make(200, 24)
    q = unit(7, 24, seed=1)
    scores, ids = idx.search(q, k=10)
    ref_scores, ref_rows = brute_force_search(x, q, 10)
    assert ids.shape == (7, 10)
    assert [[f"id{r}" for r in row] for row in ref_rows] == ids.tolist()
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_empty_slots_are_minus_one_and_empty_string():
    idx, _ = make(3, 8)
    scores, rows = idx.search_positions(unit(2, 8, 5), k=5)
    assert (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    _, ids = idx.search(unit(2, 8, 5), k=5)
    assert ids[0, 3:].tolist() == ["", ""] and all(ids[0, :3])
    empty = GalleryIndex.create(8, "fp")
    s, i = empty.search(unit(1, 8), k=2)
    assert i.tolist() == [["", ""]] and np.isneginf(s).all()


def test_round_trip_and_manifest(tmp_path):
    idx, x = make(30, 16)
    idx.save(tmp_path / "ix")
    m = read_manifest(tmp_path / "ix")
    assert (m.count, m.dim, m.model_fingerprint, m.normalized, m.factory) == (30, 16, "fp-test", True, "Flat")
    assert m.circot_version and m.faiss_version and m.model == "some/model"
    q = unit(4, 16, 9)
    for mmap in (False, True):
        loaded = GalleryIndex.load(tmp_path / "ix", mmap=mmap)
        assert loaded.ids == idx.ids and loaded.paths == idx.paths
        np.testing.assert_array_equal(loaded.search(q, 5)[1], idx.search(q, 5)[1])
        assert str(loaded.path("id3")) == "/img/3.png"
    assert GalleryIndex.load(tmp_path / "ix", mmap=True).mmapped
    with pytest.raises(CircotError, match="memory-mapped"):
        GalleryIndex.load(tmp_path / "ix", mmap=True).add(x[:1], ["new"])


def test_incremental_add_equals_rebuild(tmp_path):
    x = unit(60, 16, 3)
    ids = [f"i{k}" for k in range(60)]
    inc = GalleryIndex.create(16, "fp")
    inc.add(x[:40], ids[:40])
    inc.save(tmp_path / "ix")
    inc = GalleryIndex.load(tmp_path / "ix")
    inc.add(x[40:], ids[40:])
    inc.save(tmp_path / "ix")
    inc = GalleryIndex.load(tmp_path / "ix")
    full = GalleryIndex.create(16, "fp")
    full.add(x, ids)
    q = unit(5, 16, 4)
    assert inc.ids == full.ids
    np.testing.assert_array_equal(inc.search(q, 8)[1], full.search(q, 8)[1])
    np.testing.assert_allclose(inc.search(q, 8)[0], full.search(q, 8)[0], atol=1e-6)
    # only the current generation's files remain
    names = sorted(p.name for p in (tmp_path / "ix").iterdir())
    assert len(names) == 3 and "manifest.json" in names


def test_trained_factories_round_trip(tmp_path):
    idx, x = make(400, 16, factory="IVF4,Flat")
    idx.set_search_params(nprobe=4)  # all lists: exact
    ref = brute_force_search(x, x[:5], 3)[1]
    assert idx.search_positions(x[:5], 3)[1].tolist() == ref.tolist()
    idx.save(tmp_path / "ivf")
    loaded = GalleryIndex.load(tmp_path / "ivf", mmap=True)
    assert loaded.manifest.search_params == {"nprobe": 4}
    assert loaded.search_positions(x[:5], 3)[1].tolist() == ref.tolist()
    hnsw, xh = make(100, 16, factory="HNSW8")
    assert hnsw.search_positions(xh[:3], 1)[1][:, 0].tolist() == [0, 1, 2]


def test_bad_inputs_raise_one_line_errors(tmp_path):
    with pytest.raises(CircotError, match="factory"):
        GalleryIndex.create(8, "fp", factory="NoSuchIndex12")
    idx, x = make(5, 8)
    with pytest.raises(CircotError, match="already in the index"):
        idx.add(x[:1], ["id0"])
    with pytest.raises(CircotError, match="shape"):
        idx.search(np.zeros((2, 3)), 2)
    untrained = GalleryIndex.create(8, "fp", factory="IVF64,Flat")
    with pytest.raises(CircotError, match="cannot train"):
        untrained.train(unit(10, 8))
    with pytest.raises(CircotError, match="must be trained"):
        untrained.add(unit(1, 8), ["a"])
    with pytest.raises(CircotError, match="not an index folder"):
        GalleryIndex.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CircotError, match="not a circot index"):
        GalleryIndex.load(tmp_path)


def test_interrupted_save_keeps_previous_index(tmp_path, monkeypatch):
    idx, x = make(10, 8)
    idx.save(tmp_path / "ix")
    import circot.index as mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    idx.add(unit(1, 8, 7), ["extra"])
    monkeypatch.setattr(mod, "atomic_write_json", boom)  # crash before the manifest is replaced
    with pytest.raises(KeyboardInterrupt):
        idx.save(tmp_path / "ix")
    monkeypatch.undo()
    loaded = GalleryIndex.load(tmp_path / "ix")
    assert len(loaded) == 10 and "extra" not in loaded
    # The killed save left its vectors; a kill mid-write leaves temporary files too. The next save removes them
    # and nothing else.
    left = (
        {p.name for p in (tmp_path / "ix").iterdir()}
        - set(loaded.manifest.files.values())
        - {"manifest.json"}
    )
    assert len(left) == 1 and left.pop().startswith("vectors-000002-")
    killed = [".items-000003-0123abcd.json." + "ab" * 16 + ".tmp", ".vectors-000003-0123abcd.faiss.tmp"]
    mine = ["vectors-2.faiss", "items-000002-notes.json", "notes.txt"]
    for name in killed + mine:
        (tmp_path / "ix" / name).write_text("x")
    idx.save(tmp_path / "ix")
    files = read_manifest(tmp_path / "ix").files
    assert {p.name for p in (tmp_path / "ix").iterdir()} == {"manifest.json", *files.values(), *mine}
    assert files["index"].startswith("vectors-000004-")  # numbered past what the killed saves left
    assert len(GalleryIndex.load(tmp_path / "ix")) == 11


def test_batched_flat_search_matches_faiss_and_brute_force(tmp_path):
    from circot.index import _blocked_topk

    idx, x = make(300, 16)
    q = unit(40, 16, seed=2)  # a batch large enough for the numpy path
    scores, rows = idx.search_positions(q, 12)
    ref_s, ref_r = brute_force_search(x, q, 12)
    assert rows.tolist() == ref_r.tolist()
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    f_s, f_r = idx.faiss_index.search(q, 12)
    assert f_r.tolist() == rows.tolist()
    # small blocks, ties (duplicated vectors: lower row first) and k beyond the gallery
    g = np.concatenate([x[:5], x[:5]])
    s, r = _blocked_topk(g, x[:3], 14, block=3)
    assert r[:, :2].tolist() == [[0, 5], [1, 6], [2, 7]] and (r[:, 10:] == -1).all()
    assert np.isneginf(s[:, 10:]).all()
    idx.save(tmp_path / "ix")
    mm = GalleryIndex.load(tmp_path / "ix", mmap=True)
    assert mm.search_positions(q, 12)[1].tolist() == ref_r.tolist()


def test_save_files_are_recognised_past_generation_999999(tmp_path):
    from circot.index import _save_files

    for name in [
        "vectors-1000000-0123abcd.faiss",
        "items-1000000-0123abcd.json",
        "vectors-12345-0123abcd.faiss",
    ]:
        (tmp_path / name).write_text("x")
    assert sorted(g for g, _ in _save_files(tmp_path)) == [1000000, 1000000]  # five digits: not a save's name

from __future__ import annotations

import json

import numpy as np
import pytest

from circot.errors import CircotError
from circot.gallery import add_images, build_index, encode_gallery, list_images, shard_bounds
from circot.index import GalleryIndex, brute_force_search
from retrieval_fakes import FakeEncoder, write_images


def test_build_search_matches_brute_force(tmp_path):
    write_images(tmp_path / "g" / "sub", 5)
    write_images(tmp_path / "g", 7, start=5)
    enc = FakeEncoder()
    index = build_index(enc, tmp_path / "g", tmp_path / "ix", cache_dir=tmp_path / "cache", batch_size=4)
    ids, paths = list_images(tmp_path / "g")
    assert index.ids == ids and "sub/img-0000.png" in ids
    vecs = enc.encode_images(paths)
    loaded = GalleryIndex.load(tmp_path / "ix")
    scores, got = loaded.search(vecs[:3], k=4)
    ref_scores, ref_rows = brute_force_search(vecs, vecs[:3], 4)
    assert got.tolist() == [[ids[r] for r in row] for row in ref_rows]
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert loaded.manifest.model_fingerprint == enc.fingerprint and loaded.manifest.count == 12


def test_interrupted_build_resumes(tmp_path):
    write_images(tmp_path / "g", 20)
    crashing = FakeEncoder(fail_after=3)  # crashes on the 4th batch
    with pytest.raises(KeyboardInterrupt):
        build_index(crashing, tmp_path / "g", tmp_path / "ix", batch_size=2, flush_every=2, use_cache=False)
    assert not (tmp_path / "ix" / "manifest.json").exists()  # no index, not a corrupt one
    resumed = FakeEncoder()
    index = build_index(
        resumed, tmp_path / "g", tmp_path / "ix", batch_size=2, flush_every=2, use_cache=False
    )
    assert resumed.images == 14  # the 6 images encoded before the crash were not encoded again
    assert len(GalleryIndex.load(tmp_path / "ix")) == 20 == len(index)
    assert not (tmp_path / ".ix.shards").exists()  # work folder removed after success


def test_incremental_add_equals_rebuild(tmp_path):
    write_images(tmp_path / "a", 6)
    write_images(tmp_path / "b", 4, start=6)
    enc = FakeEncoder()
    build_index(enc, tmp_path / "a", tmp_path / "ix", cache_dir=tmp_path / "c1")
    enc_add = FakeEncoder()
    # adding the folder again plus new ones: old ids are skipped, never re-encoded
    (tmp_path / "all").mkdir()
    for p in list((tmp_path / "a").iterdir()) + list((tmp_path / "b").iterdir()):
        (tmp_path / "all" / p.name).write_bytes(p.read_bytes())
    index, added = add_images(tmp_path / "ix", enc_add, tmp_path / "all", cache_dir=tmp_path / "c2")
    assert added == 4 and enc_add.images == 4
    rebuilt = build_index(FakeEncoder(), tmp_path / "all", tmp_path / "ix2", cache_dir=tmp_path / "c3")
    inc = GalleryIndex.load(tmp_path / "ix")
    q = FakeEncoder().encode_images(sorted((tmp_path / "b").iterdir()))
    assert inc.ids == rebuilt.ids
    np.testing.assert_array_equal(inc.search(q, 10)[1], rebuilt.search(q, 10)[1])
    with pytest.raises(CircotError, match="built by model"):
        add_images(tmp_path / "ix", FakeEncoder(fingerprint="other"), tmp_path / "b")


def test_sharded_encoding_merges_in_order(tmp_path):
    paths = write_images(tmp_path / "g", 9)
    assert [shard_bounds(9, r, 2) for r in range(2)] == [(0, 4), (4, 9)]
    enc = FakeEncoder()
    # rank 1 first (as another process would), then rank 0 merges
    assert encode_gallery(enc, paths, None, work_dir=tmp_path / "w", rank=1, world_size=2) is None
    assert enc.images == 5
    merged = encode_gallery(enc, paths, None, work_dir=tmp_path / "w", rank=0, world_size=2, timeout=5)
    np.testing.assert_array_equal(merged, FakeEncoder().encode_images(paths))
    # re-run: shard files are reused, nothing is encoded
    again = FakeEncoder()
    encode_gallery(again, paths, None, work_dir=tmp_path / "w", rank=0, world_size=2, timeout=5)
    assert again.images == 0


def test_sharded_build_from_environment(tmp_path, monkeypatch):
    write_images(tmp_path / "g", 7)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert build_index(FakeEncoder(), tmp_path / "g", tmp_path / "ix", use_cache=False) is None
    monkeypatch.setenv("RANK", "0")
    index = build_index(FakeEncoder(), tmp_path / "g", tmp_path / "ix", use_cache=False)
    assert len(index) == 7 and len(GalleryIndex.load(tmp_path / "ix")) == 7


def test_list_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CircotError, match="no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(CircotError, match="neither"):
        list_images(tmp_path / "missing")
    write_images(tmp_path / "g", 2)
    lst = tmp_path / "list.txt"
    lst.write_text("g/img-0000.png\n# comment\ng/img-0001.png\n")
    ids, paths = list_images(lst)
    assert ids == ["g/img-0000.png", "g/img-0001.png"] and paths[0].is_file()
    lst.write_text("g/nope.png\n")
    with pytest.raises(CircotError, match="list.txt:1"):
        list_images(lst)
    (tmp_path / "g" / "bad.png").write_bytes(b"not an image")

    class Strict(FakeEncoder):
        def encode_images(self, images, batch_size=32, show_progress_bar=False):
            from PIL import Image

            for p in images:
                Image.open(p).load()
            return super().encode_images(images)

    with pytest.raises(CircotError, match="bad.png"):
        build_index(Strict(), tmp_path / "g", tmp_path / "ix", use_cache=False)


@pytest.mark.slow
def test_two_processes_encode_shards_and_rank0_merges(tmp_path):
    """Two real processes launched like torchrun (RANK / WORLD_SIZE): each encodes half, rank 0 writes the index."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_images(tmp_path / "g", 11)
    here = Path(__file__).parent
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "from retrieval_fakes import FakeEncoder; from circot.gallery import build_index;"
        "enc = FakeEncoder(); ix = build_index(enc, sys.argv[2], sys.argv[3], use_cache=False);"
        "print(json.dumps({'encoded': enc.images, 'count': None if ix is None else len(ix)}))"
    )
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, str(here), str(tmp_path / "g"), str(tmp_path / "ix")],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == {"encoded": 5, "count": 11} and outs[1] == {"encoded": 6, "count": None}
    index = GalleryIndex.load(tmp_path / "ix")
    np.testing.assert_allclose(
        index.vectors(), FakeEncoder().encode_images(list_images(tmp_path / "g")[1]), atol=1e-6
    )

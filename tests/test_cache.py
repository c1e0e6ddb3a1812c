from __future__ import annotations

import numpy as np
import pytest

from circot.cache import CoTCache, EmbeddingCache, encode_cached, hash_file
from circot.errors import CircotError
from retrieval_fakes import FakeEncoder, write_images


def test_cache_hit_skips_encoding(tmp_path):
    paths = write_images(tmp_path / "imgs", 10)
    keys = [hash_file(p) for p in paths]
    enc = FakeEncoder()
    cache = EmbeddingCache(tmp_path / "cache", enc.fingerprint)
    first = encode_cached(paths, keys, enc.encode_images, cache, batch_size=4)
    assert enc.images == 10 and enc.calls == 3
    again = encode_cached(paths, keys, enc.encode_images, EmbeddingCache(tmp_path / "cache", enc.fingerprint))
    assert enc.images == 10  # nothing re-encoded, even from a fresh cache object
    np.testing.assert_array_equal(first, again)
    # one new image: only it is encoded
    more = write_images(tmp_path / "imgs", 1, start=10)
    encode_cached(paths + more, keys + [hash_file(more[0])], enc.encode_images, cache)
    assert enc.images == 11


def test_cache_is_per_fingerprint_and_content(tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    keys = [hash_file(p) for p in paths]
    enc = FakeEncoder()
    encode_cached(paths, keys, enc.encode_images, EmbeddingCache(tmp_path / "c", "model-a"))
    other = EmbeddingCache(tmp_path / "c", "model-b")
    assert not other.get(keys)[1].any()
    # same bytes under another name hit; duplicates are encoded once
    copy = tmp_path / "copy.png"
    copy.write_bytes(paths[0].read_bytes())
    assert hash_file(copy) == keys[0]
    enc2 = FakeEncoder()
    encode_cached([copy, copy, paths[1]], [keys[0], keys[0], keys[1]], enc2.encode_images, other)
    assert enc2.images == 2


def test_fp16_storage_scored_in_fp32(tmp_path):
    cache = EmbeddingCache(tmp_path, "fp", dtype="float16")
    v = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    cache.put(["a", "b", "c", "d"], v)
    got, hit = EmbeddingCache(tmp_path, "fp").get(["a", "x", "d"])
    assert hit.tolist() == [True, False, True] and got.dtype == np.float32
    np.testing.assert_allclose(got[[0, 2]], v[[0, 3]], rtol=1e-3, atol=1e-3)
    with pytest.raises(CircotError, match="dimension"):
        cache.put(["e"], np.zeros((1, 5)))


def test_half_written_chunk_is_ignored(tmp_path):
    cache = EmbeddingCache(tmp_path, "fp")
    cache.put(["a"], np.ones((1, 4)))
    # vectors written but the keys file (the commit point) never was: not visible
    np.save(cache.folder / "crashed.npy", np.zeros((1, 4), np.float32))
    (cache.folder / ".junk.npy.tmp").write_bytes(b"partial")
    fresh = EmbeddingCache(tmp_path, "fp")
    assert len(fresh) == 1 and fresh.get(["a"])[1].all()


def test_cot_cache_round_trip(tmp_path):
    c = CoTCache(tmp_path, "fp")
    key = CoTCache.key("imagehash", "make it red")
    assert key != CoTCache.key("imagehash", "make it blue")
    c.put({key: {"caption": "a", "reasoning": "b", "conclusion": "c"}})
    assert CoTCache(tmp_path, "fp").get(key)["conclusion"] == "c"
    assert CoTCache(tmp_path, "other").get(key) is None

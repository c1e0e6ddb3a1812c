"""The vector store interface, run against both backends with their real engines: faiss and milvus-lite."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from circot.errors import CircotError
from circot.index import brute_force_search, index_lock
from circot.store import (
    DEFAULT_COLLECTION,
    VectorStore,
    build_store,
    open_store,
    parse_store_uri,
    read_store_manifest,
    store_writer,
)

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

DIM = 12
BACKENDS = ["faiss", "milvus-lite"]


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(params=BACKENDS)
def uri(request, tmp_path):
    if request.param == "faiss":
        return str(tmp_path / "ix")
    return f"milvus-lite://{tmp_path / 'gallery.db'}?collection=shop"


def build(uri, vectors, ids, paths=None, fingerprint="fp-1", model="model-ref"):
    with build_store(uri, vectors.shape[1], fingerprint, model=model) as store:
        store.add(vectors, ids, paths if paths is not None else [f"/img/{i}.png" for i in ids])
    return store


def close(store):
    if hasattr(store, "close"):
        store.close()


def expected(vectors, ids, queries, k):
    scores, rows = brute_force_search(vectors, queries, k)
    return scores, np.asarray(ids, dtype=object)[rows]


def test_build_add_search_equals_exact_search_and_reloads(uri):
    rng = np.random.default_rng(0)
    x = unit(rng, 60)
    ids = [f"item-{i:03d}" for i in range(60)]
    build(uri, x[:40], ids[:40])
    with store_writer(uri) as store:
        assert isinstance(store, VectorStore)
        store.add(x[40:], ids[40:], [f"/img/{i}.png" for i in ids[40:]])
    q = unit(rng, 7)
    store = open_store(uri)
    try:
        assert len(store) == 60 and sorted(store.ids) == ids and "item-041" in store and "zz" not in store
        assert (store.dim, store.model_fingerprint, store.manifest.model) == (DIM, "fp-1", "model-ref")
        scores, found = store.search(q, 5)
        want_s, want_ids = expected(x, ids, q, 5)
        assert scores.dtype == np.float32 and scores.shape == (7, 5) and found.shape == (7, 5)
        assert (found == want_ids).all()
        np.testing.assert_allclose(scores, want_s, atol=1e-5)
        assert str(store.path_of("item-041")) == "/img/item-041.png"
        with pytest.raises(CircotError, match="unknown gallery id"):
            store.path_of("nope")
        # more slots than items: padded with -inf and ""
        scores, found = store.search(q[:1], 64)
        assert np.isneginf(scores[0, 60:]).all() and set(found[0, 60:]) == {""} and "" not in found[0, :60]
    finally:
        close(store)
    manifest = read_store_manifest(uri)
    assert manifest.count == 60 and manifest.dim == DIM and manifest.model_fingerprint == "fp-1"


def test_upsert_replaces_vector_and_path_and_delete_removes(uri):
    rng = np.random.default_rng(1)
    x = unit(rng, 30)
    ids = [f"i{i}" for i in range(30)]
    ids[5], ids[6] = 'say "cheese".png', "back\\slash/é.png"  # quotes, backslashes, non-ASCII
    build(uri, x, ids)
    moved = unit(rng, 2)
    with store_writer(uri) as store:
        store.upsert(moved, ["i3", "new"], ["/moved/3.png", "/new.png"])
        assert store.delete([ids[5], ids[6], "not-there"]) == 2
        with pytest.raises(CircotError, match="already in the index"):
            store.add(x[:1], ["i0"])
    now_ids = [i for n, i in enumerate(ids) if n not in (3, 5, 6)] + ["i3", "new"]
    now_x = np.concatenate([x[[i for i in range(30) if i not in (3, 5, 6)]], moved])
    store = open_store(uri)
    try:
        assert len(store) == 29 and sorted(store.ids) == sorted(now_ids)
        assert ids[5] not in store and str(store.path_of("i3")) == "/moved/3.png"
        q = np.concatenate([moved, unit(rng, 4)])
        scores, found = store.search(q, 6)
        want_s, want_ids = expected(now_x, now_ids, q, 6)
        assert (found == want_ids).all() and found[0, 0] == "i3" and found[1, 0] == "new"
        np.testing.assert_allclose(scores, want_s, atol=1e-5)
    finally:
        close(store)


def test_a_store_built_by_another_model_is_refused(uri):
    build(uri, unit(np.random.default_rng(2), 5), list("abcde"), fingerprint="model-A")
    with pytest.raises(CircotError, match="built by model model-A.*not by the given model model-B"):
        open_store(uri, model_fingerprint="model-B")
    close(open_store(uri, model_fingerprint="model-A"))


def test_a_crash_mid_build_leaves_the_previous_store_usable(uri):
    rng = np.random.default_rng(3)
    x = unit(rng, 20)
    build(uri, x, [f"old-{i}" for i in range(20)])
    with pytest.raises(RuntimeError, match="simulated crash"), build_store(uri, DIM, "fp-2") as store:
        store.add(unit(rng, 8), [f"new-{i}" for i in range(8)])
        raise RuntimeError("simulated crash")
    store = open_store(uri, model_fingerprint="fp-1")
    try:
        assert len(store) == 20 and all(i.startswith("old-") for i in store.ids)
        if "milvus" in uri:  # the unfinished build's collection is gone
            names = store._client.call("listing", "list_collections")
            assert names == [store._client.target_of("shop")]
        assert store.search(x[4:5], 1)[1][0, 0] == "old-4"
    finally:
        close(store)
    build(uri, x[:3], ["a", "b", "c"])  # and the next build goes through
    assert read_store_manifest(uri).count == 3


def test_a_build_removes_only_what_it_wrote(tmp_path):
    from pymilvus import DataType, MilvusClient

    rng = np.random.default_rng(4)
    # faiss: the user's files in the index folder stay
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "notes.txt").write_text("mine")
    build(str(tmp_path / "ix"), unit(rng, 4), list("abcd"))
    build(str(tmp_path / "ix"), unit(rng, 4), list("efgh"))
    assert (tmp_path / "ix" / "notes.txt").read_text() == "mine"
    # milvus-lite: the user's own collection in the same database, and files beside it, stay
    db = tmp_path / "photos.db"
    client = MilvusClient(str(db))
    schema = MilvusClient.create_schema(auto_id=True)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
    params = client.prepare_index_params()
    params.add_index(field_name="v", index_type="FLAT", metric_type="L2")
    client.create_collection("users_own", schema=schema, index_params=params)
    client.insert("users_own", [{"v": [0.0, 1.0]}])
    client.close()
    (tmp_path / "photos.db.notes").write_text("mine")
    for names in (list("abcd"), list("efgh"), list("ij")):
        build(str(db), unit(rng, len(names)), names)
    assert read_store_manifest(str(db)).count == 2
    client = MilvusClient(str(db))
    try:
        collections = client.list_collections()
        assert "users_own" in collections
        assert len([c for c in collections if c.startswith(f"{DEFAULT_COLLECTION}__circot_")]) == 1
        assert client.query("users_own", filter="", output_fields=["count(*)"])[0]["count(*)"] == 1
        # a collection that circot did not make is not taken over
        with pytest.raises(CircotError, match="not made by circot"):
            open_store(f"milvus-lite://{db}?collection=users_own")
    finally:
        client.close()
    assert (tmp_path / "photos.db.notes").read_text() == "mine"


def test_writers_are_serialised(tmp_path):
    # faiss: the folder lock
    build(str(tmp_path / "ix"), unit(np.random.default_rng(5), 3), list("abc"))
    with index_lock(tmp_path / "ix"), pytest.raises(CircotError, match="another circot run is writing"):
        store_writer(str(tmp_path / "ix")).__enter__()
    # milvus-lite: the engine's lock on its database, held by another process
    db = tmp_path / "g.db"
    build(str(db), unit(np.random.default_rng(5), 3), list("abc"))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from pymilvus import MilvusClient; c = MilvusClient({str(db)!r}); "
            "print('open', flush=True); input()",
        ],  # fmt: skip
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(CircotError, match="another process has this milvus-lite database open"):
            store_writer(str(db)).__enter__()
    finally:
        holder.communicate("\n", timeout=60)
    with store_writer(str(db)) as store:  # free again once the other process is done
        assert store.delete(["a"]) == 1


def test_store_uris():
    assert parse_store_uri("some/folder").kind == "faiss"
    lite = parse_store_uri("milvus-lite:///data/g.db?collection=shop&index=hnsw&M=16&ef=32")
    assert (lite.kind, str(lite.path), lite.collection, lite.index_type) == (
        "milvus-lite",
        "/data/g.db",
        "shop",
        "HNSW",
    )
    assert lite.build_params == {"M": 16} and lite.search_params == {"ef": 32}
    plain = parse_store_uri("data/g.db")
    assert (plain.kind, plain.collection) == ("milvus-lite", DEFAULT_COLLECTION)
    server = parse_store_uri("milvus://db.example:19531/products")
    assert (server.kind, server.client_uri, server.collection) == (
        "milvus",
        "http://db.example:19531",
        "products",
    )
    assert parse_store_uri("milvus+https://db.example/p").client_uri == "https://db.example:19530"
    for bad, match in [
        ("qdrant://h/x", "unknown scheme"),
        ("milvus://h/bad-name", "collection name"),
        ("milvus-lite:///g.db?index=ANNOY", "index="),
        ("milvus-lite:///g.db?nprobe=0", "positive"),
        ("milvus://h/x?collection=y", "unknown option 'collection'"),
        ("milvus://:19530/x", "no host"),
    ]:
        with pytest.raises(CircotError, match=match):
            parse_store_uri(bad)


def test_an_unreachable_milvus_server_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("CIRCOT_MILVUS_TIMEOUT", "2")
    t0 = time.monotonic()
    with pytest.raises(CircotError, match=r"cannot reach the Milvus server at http://127.0.0.1:1"):
        open_store("milvus://127.0.0.1:1/gallery")
    assert time.monotonic() - t0 < 60  # a refused connection is reported, not waited on forever


def test_hnsw_collection_and_faiss_factories_keep_the_interface(tmp_path):
    rng = np.random.default_rng(6)
    x = unit(rng, 200)
    ids = [str(i) for i in range(200)]
    for uri in (
        f"milvus-lite://{tmp_path / 'h.db'}?index=HNSW&M=8&efConstruction=64",
        str(tmp_path / "hnsw"),
    ):
        factory = "Flat" if "milvus" in uri else "HNSW16"
        with build_store(uri, DIM, "fp", factory=factory) as store:
            store.add(x, ids)
            store.delete(["7"])
        store = open_store(uri + ("&ef=128" if "milvus" in uri else ""))
        try:
            assert len(store) == 199 and "7" not in store
            if "milvus" in uri:  # search parameters of the URI override the stored ones
                assert (store.manifest.factory, store.manifest.search_params) == ("HNSW", {"ef": 128})
            scores, found = store.search(x[:20], 10)
            truth = expected(np.delete(x, 7, axis=0), [i for i in ids if i != "7"], x[:20], 10)[1]
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
            assert recall > 0.9, (uri, recall)
        finally:
            close(store)
    with pytest.raises(CircotError, match="does not apply to Milvus"):
        build_store(f"milvus-lite://{tmp_path / 'h.db'}", DIM, "fp", factory="IVF4,Flat").__enter__()


def test_closing_one_milvus_lite_store_leaves_the_others_of_the_process_working(tmp_path):
    x = unit(np.random.default_rng(7), 6)
    db = str(tmp_path / "g.db")
    build(db, x, list("abcdef"))
    first = open_store(db)
    second = open_store(db)
    second.close()
    build(db, x[:2], ["a", "b"])  # opens and closes its own client
    try:
        assert len(first) == 2 and first.search(x[1:2], 1)[1][0, 0] == "b"
    finally:
        first.close()
    with pytest.raises(CircotError, match="searching on a closed store handle; open it again"):
        second.search(x[:1], 1)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_faiss_delete_and_upsert_keep_rows_and_items_together(tmp_path, factory):
    from circot.index import GalleryIndex

    rng = np.random.default_rng(8)
    x = unit(rng, 120)
    ids = [f"i{i}" for i in range(120)]
    index = GalleryIndex.create(DIM, "fp", factory=factory)
    index.train(x)
    index.add(x, ids, [f"/{i}" for i in ids])
    if factory.startswith("IVF"):
        index.set_search_params(nprobe=4)  # every list: exact
    assert index.delete(["i0", "i50", "i50", "nope"]) == 2
    index.upsert(-x[7:8], ["i7"], ["/moved"])
    index.save(tmp_path / "ix")
    loaded = GalleryIndex.load(tmp_path / "ix")
    assert len(loaded) == 118 and loaded.ids[-1] == "i7" and str(loaded.path_of("i7")) == "/moved"
    keep = [n for n in range(120) if n not in (0, 7, 50)]
    now_ids = [ids[n] for n in keep] + ["i7"]
    now_x = np.concatenate([x[keep], -x[7:8]])
    if not factory.startswith("IVF"):  # IVF cannot return its vectors without a direct map
        np.testing.assert_allclose(loaded.vectors(), now_x, atol=1e-6)
    found = loaded.search(now_x[::10], 1)[1][:, 0]
    assert list(found) == now_ids[::10]

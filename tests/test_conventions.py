"""What a user expects: several files after one flag, ``from circot import CIRCoT``, single items to encode,
quiet progress in logs, rounded JSON, and a model folder that never disappears while it is replaced."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cir_datasets import build_cirr
from retrieval_fakes import tiny_model, write_images


def test_score_takes_several_files_after_one_flag(cli, tmp_path):
    from circot import submission
    from circot.data import load_split

    root = build_cirr(tmp_path / "cirr_dataset", splits=("val",))
    split = load_split("cirr", root, "val")
    scores = np.random.default_rng(0).random((len(split.queries), len(split.gallery.ids)), dtype=np.float32)
    recall, subset = submission.write_cirr_submission(split, tmp_path / "sub", scores)
    base = ["score", "--dataset", "cirr", "--root", root, "--split", "val"]
    code, one_flag, err = cli(*base, "--predictions", recall, subset, "--json", tmp_path / "a.json")
    assert code == 0, err
    code, repeated, err = cli(*base, "--predictions", recall, "--predictions", subset)
    assert code == 0, err
    assert one_flag == repeated and "Rs@1" in one_flag
    assert "Rs@1" in json.loads((tmp_path / "a.json").read_text())


def test_public_names_import_from_the_package_without_slowing_it():
    code = (
        "import sys, circot; assert 'torch' not in sys.modules, 'import circot loaded torch';"
        "import circot.cli; assert 'torch' not in sys.modules, 'the CLI loaded torch';"
        "from circot import CIRCoT, GalleryIndex, CoT, CircotError, build_index, search_query, load_split;"
        "import circot.model; assert CIRCoT is circot.model.CIRCoT; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    import circot

    with pytest.raises(AttributeError):
        circot.NoSuchThing  # noqa: B018


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_encode_a_single_item(model, tmp_path):
    (path,) = write_images(tmp_path, 1, size=24)
    other = Image.new("RGB", (24, 24), (0, 0, 200))
    batch = model.encode_images([path, other])
    one = model.encode_images(path)
    assert one.shape == (model.embedding_dim,)
    np.testing.assert_allclose(one, batch[0], atol=1e-5)
    np.testing.assert_allclose(model.encode_images(str(path)), batch[0], atol=1e-5)
    np.testing.assert_allclose(model.encode_images(other), batch[1], atol=1e-5)

    queries = model.encode_queries([path, other], ["make it red", "make it blue"], mode="fast")
    single = model.encode_queries(path, "make it red", mode="fast")
    assert single.shape == (model.embedding_dim,)
    np.testing.assert_allclose(single, queries[0], atol=1e-5)
    emb, cot = model.encode_queries(other, "make it blue", mode="full", return_reasoning=True)
    assert emb.shape == (model.embedding_dim,) and cot is not None
    given = {"caption": "a square", "reasoning": "make it blue", "conclusion": "a blue square"}
    from_given = model.encode_queries(other, "make it blue", mode="full", cots=given)
    assert from_given.shape == (model.embedding_dim,)


@pytest.mark.parametrize("batch_size", [0, -3])
def test_bad_batch_size_is_one_clear_error(model, batch_size):
    from circot.errors import CircotError

    with pytest.raises(CircotError, match="batch_size must be a positive integer"):
        model.encode_images([Image.new("RGB", (24, 24))], batch_size=batch_size)
    with pytest.raises(CircotError, match="batch_size must be a positive integer"):
        model.encode_queries([Image.new("RGB", (24, 24))], ["x"], mode="fast", batch_size=batch_size)


class NotATerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_in_a_log_is_a_few_lines_a_minute(monkeypatch):
    from circot.cache import encode_cached

    log = NotATerminal()
    monkeypatch.setattr(sys, "stderr", log)

    def slow_encode(batch):
        time.sleep(0.02)
        return np.ones((len(batch), 4), np.float32)

    items = list(range(60))  # 1.2 s of work: a live bar would redraw a dozen times
    encode_cached(items, [str(i) for i in items], slow_encode, None, batch_size=1, progress=True)
    updates = log.getvalue().count("\r") + log.getvalue().count("\n")
    assert 0 < updates <= 3, log.getvalue()


def test_json_outputs_are_rounded():
    from circot.evaluate import EvaluationReport
    from circot.search import Hit, QueryResult

    report = EvaluationReport(
        dataset="shapes", split="val", mode="fast", model_fingerprint="f", n_queries=5, n_gallery=9,
        metrics=SimpleNamespace(metrics={"R@1": 55.400000000000006, "R@5": 0.1 + 0.2}, conventions={}),
        timings={"encode_s": 1.23456789123},
    )  # fmt: skip
    text = json.dumps(report.to_dict())
    assert '"R@1": 55.4,' in text and "0.30000000000000004" not in text and "1.23456789" not in text
    result = QueryResult(
        text="t", mode="fast", cot=None, hits=[Hit(1, "a", 0.123456789123, "/a.png")],
        timings={"total_s": 0.000123456789},
    )  # fmt: skip
    out = result.to_dict()
    assert out["results"][0]["score"] == 0.123457 and out["timings"]["total_s"] == 0.000123


def test_save_pretrained_never_leaves_the_model_folder_missing(model, tmp_path, monkeypatch):
    target = tmp_path / "model"
    model.save_pretrained(target)
    (target / "marker-of-the-old-one").write_text("old")
    seen = []
    real_replace, real_rename = os.replace, os.rename

    def check(name):
        def wrapped(src, dst, *args, **kwargs):
            result = (real_replace if name == "replace" else real_rename)(src, dst, *args, **kwargs)
            seen.append((name, str(src), str(dst)))
            assert (target / "circot_config.json").is_file(), (
                f"{target} is missing after {name}({src}, {dst})"
            )
            return result

        return wrapped

    monkeypatch.setattr(os, "replace", check("replace"))
    monkeypatch.setattr(os, "rename", check("rename"))
    model.save_pretrained(target)
    monkeypatch.undo()
    assert not (target / "marker-of-the-old-one").exists()  # the new folder replaced the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left beside it
    from circot.model import CIRCoT

    assert CIRCoT.from_pretrained(target).fingerprint == model.fingerprint


def test_replace_directory_without_an_atomic_swap_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    import circot.fileops as fileops

    monkeypatch.setattr(fileops, "exchange_paths", lambda a, b: False)
    old, new = tmp_path / "d", tmp_path / "new"
    old.mkdir()
    (old / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    fileops.replace_directory(new, old)
    assert (old / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]

    (tmp_path / "again").mkdir()
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # moving the new folder in fails
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        fileops.replace_directory(tmp_path / "again", old)
    monkeypatch.undo()
    assert (old / "f").read_text() == "new"  # the old folder is back in place

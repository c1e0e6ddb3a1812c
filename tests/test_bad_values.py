"""Bad values give one ``error:`` line and a non-zero exit, never a traceback: wrong JSON types in a shapes
annotation file, images too large or too thin, bad devices, an --out that cannot be written."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from circot.errors import CircotError
from retrieval_fakes import png_claiming, tiny_model_dir, write_images


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------ shapes annotations
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from circot.data.shapes import generate_report

    root = tmp_path_factory.mktemp("world") / "shapes"
    generate_report(root, n_train=4, n_val=4, n_test=4, n_novel=6, image_size=56)
    return root


def spoil(root, tmp_path, change):
    copy = tmp_path / "shapes"
    shutil.copytree(root, copy)
    data = json.loads((copy / "val.json").read_text())
    data = change(data)
    (copy / "val.json").write_text(json.dumps(data))
    return copy


def _set_query(field, value):
    def change(data):
        data["queries"][0][field] = value
        return data

    return change


BAD_FILES = {
    "null top level": (lambda data: None, "top level"),
    "targets: 7": (_set_query("targets", 7), "queries[0].targets"),
    "reference: list": (_set_query("reference", ["a"]), "queries[0].reference"),
    "gold_cot: str": (_set_query("gold_cot", "x"), "queries[0].gold_cot"),
    "text: null": (_set_query("text", None), "queries[0].text"),
    "target_scene: list": (_set_query("target_scene", []), "queries[0].target_scene"),
    "queries: dict": (lambda data: {**data, "queries": {}}, "'queries'"),
    "images: list": (lambda data: {**data, "images": []}, "'images'"),
    "gallery entry: int": (lambda data: {**data, "gallery": [3]}, "gallery[0]"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_shapes_annotation_types_in_data_check(cli, world, tmp_path, case):
    change, where = BAD_FILES[case]
    root = spoil(world, tmp_path, change)
    code, out, err = cli("-q", "data", "check", "--dataset", "shapes", "--root", root, "--split", "val")
    one_error_line(err)  # the summary; the report names the file and the field
    assert code != 0 and any("val.json" in line and where in line for line in out.splitlines()), out


@pytest.mark.parametrize("case", ["targets: 7", "gold_cot: str", "null top level"])
def test_shapes_annotation_types_in_eval_and_annotate(cli, world, tmp_path, case, monkeypatch):
    monkeypatch.setenv("CIRCOT_CACHE", str(tmp_path / "cache"))
    change, where = BAD_FILES[case]
    root = spoil(world, tmp_path, change)
    model = tiny_model_dir(tmp_path / "model")
    code, _, err = cli("eval", "--model", model, "--dataset", "shapes", "--root", root, "--split", "val")
    assert code != 0 and where in one_error_line(err)
    code, _, err = cli(
        "annotate", "--dataset", "shapes", "--root", root, "--split", "val", "--teacher", "shapes",
        "--out", tmp_path / "ann.jsonl", "--no-progress",
    )  # fmt: skip
    assert code != 0 and where in one_error_line(err)


# ------------------------------------------------------------------------------------------ images and devices
def test_load_image_refuses_a_decompression_bomb(tmp_path):
    from circot.processing import load_image

    (tmp_path / "huge.png").write_bytes(png_claiming(30000, 30000))
    with pytest.raises(CircotError, match="huge.png: image too large"):
        load_image(tmp_path / "huge.png")


@pytest.mark.parametrize("size", [(5000, 10), (10, 5000), (800, 1)])
def test_extreme_aspect_ratios_are_padded(size):
    from circot.processing import fit_aspect_ratio
    from retrieval_fakes import tiny_model

    model = tiny_model()
    strip = Image.new("RGB", size, (250, 0, 0))
    fitted = fit_aspect_ratio(strip)
    assert max(fitted.size) / min(fitted.size) <= 200 and max(fitted.size) == max(size)
    emb = model.encode_images([strip, Image.new("RGB", (56, 56))])
    assert emb.shape == (2, model.embedding_dim)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A tiny model folder and an index built by the command line over a folder holding a 5000×10 strip."""
    from circot.cli import main

    base = tmp_path_factory.mktemp("indexed")
    model = tiny_model_dir(base / "model")
    write_images(base / "g", 3, size=24)
    Image.new("RGB", (5000, 10), (0, 0, 255)).save(base / "g" / "strip.png")
    code = main(["index", "build", "--model", str(model), "--images", str(base / "g"), "--out", str(base / "ix"),
                 "--cache", str(base / "cache"), "--json"])  # fmt: skip
    assert code == 0  # one thin image no longer aborts the build
    return base


def test_search_with_odd_images_and_devices(cli, indexed, tmp_path):
    ix = indexed / "ix"
    base = ["search", "--index", ix, "--text", "make it red", "--mode", "fast", "--k", "2"]
    code, out, err = cli(*base, "--image", indexed / "g" / "strip.png", "--json")
    assert code == 0, err
    assert len(json.loads(out)["results"]) == 2

    (tmp_path / "huge.png").write_bytes(png_claiming(30000, 30000))
    code, _, err = cli(*base, "--image", tmp_path / "huge.png")
    assert code != 0 and "huge.png: image too large" in one_error_line(err)

    code, _, err = cli(*base, "--image", indexed / "g" / "img-0000.png", "--device", "banana")
    assert code != 0 and "--device 'banana'" in one_error_line(err)


def test_cuda_on_a_cpu_only_torch_is_one_error(cli, indexed):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = cli(
        "index", "build", "--images", indexed / "g", "--out", indexed / "ix-cuda", "--device", "cuda",
        "--model", indexed / "model",
    )  # fmt: skip
    assert code != 0 and "CUDA is not available" in one_error_line(err)


def test_out_that_cannot_be_written_is_refused_before_encoding(cli, indexed, tmp_path, monkeypatch):
    import circot.search

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(circot.search, "load_model", no_model)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "ix", "/proc/circot-index"):
        code, _, err = cli("index", "build", "--images", indexed / "g", "--out", out)
        assert code != 0 and str(out) in one_error_line(err)

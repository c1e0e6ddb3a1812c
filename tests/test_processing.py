"""Image preprocessing: the vectorised path equals transformers' PIL processor; the path cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from circot.errors import CircotError
from circot.processing import CIRCoTProcessor, ImagePreprocessor, make_image_processor


def _images(sizes):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("bounds", [(112 * 112, 112 * 112), (None, None)])
def test_same_patches_as_the_transformers_processor(bounds):
    ip = make_image_processor(*bounds)
    images = _images([(112, 112), (90, 130), (112, 112), (56, 84), (200, 150)])
    pixels, grids = ImagePreprocessor(ip)(images)
    want = ip(images=images, return_tensors="pt")
    assert torch.equal(grids, want["image_grid_thw"])
    torch.testing.assert_close(pixels, want["pixel_values"], atol=1e-5, rtol=0)


def test_path_cache_reads_once_and_sees_changes(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    _images([(112, 112)])[0].save(path)
    pre = ImagePreprocessor(make_image_processor(112 * 112, 112 * 112), cache_size=2)
    first, _ = pre([path])
    import circot.processing as processing

    calls = []
    real = processing.load_image
    monkeypatch.setattr(processing, "load_image", lambda im, i=None: calls.append(im) or real(im, i))
    again, _ = pre([path, path])
    assert calls == [] and torch.equal(again[: len(first)], first)
    _images([(112, 112)])[0].transpose(Image.FLIP_LEFT_RIGHT).save(path)
    changed, _ = pre([path])
    assert calls == [path] and not torch.equal(changed, first)


def test_bad_images_are_one_line_errors(tmp_path):
    pre = ImagePreprocessor(make_image_processor())
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(CircotError, match="bad.png"):
        pre([tmp_path / "bad.png"])
    with pytest.raises(CircotError, match="no images"):
        pre([])


def test_processor_without_video_processor_round_trips(tmp_path):
    from circot.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a red circle"] * 3, vocab_size=300)
    proc = CIRCoTProcessor(make_image_processor(112 * 112, 112 * 112), tok)
    assert not hasattr(proc, "video_processor") or proc.video_processor is None
    proc.save_pretrained(tmp_path)
    loaded = CIRCoTProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.size.longest_edge == 112 * 112
    assert loaded.tokenizer.convert_tokens_to_ids("<emb>") == tok.convert_tokens_to_ids("<emb>")

"""The real Qwen BPE (shipped in the dashscope package) with a tiny random Qwen2-VL."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from circot import prompts

pytestmark = pytest.mark.slow  # converting 151k BPE ranks takes several seconds


@pytest.fixture(scope="module")
def qwen_tokenizer():
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("dashscope is not installed (pip install --no-deps dashscope)")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    from circot.tokenizer import qwen_tokenizer_from_tiktoken

    return qwen_tokenizer_from_tiktoken(path)


def test_qwen_tokenizer_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    ids = tok.convert_tokens_to_ids(prompts.QWEN_SPECIAL_TOKENS)
    assert ids == list(range(151643, 151657))  # the ids of the Qwen2-VL checkpoints
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    tags = tok.convert_tokens_to_ids(prompts.SPECIAL_TOKENS)
    assert min(tags) >= 151657 and len(set(tags)) == len(tags)
    text = prompts.render_prompt(prompts.query_instruction("make it red", "full"), 4) + prompts.format_cot(
        {"caption": "a dog", "reasoning": "recolour", "conclusion": "a red dog"}
    )
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert enc.count(tok.convert_tokens_to_ids(prompts.IMAGE_PAD)) == 4
    assert tok.decode(enc) == text
    rendered = tok.apply_chat_template(
        prompts.chat_messages("hi"), tokenize=False, add_generation_prompt=True
    )
    assert rendered == prompts.render_prompt("hi", 1)


def test_tiny_model_with_the_qwen_tokenizer(qwen_tokenizer, tmp_path):
    from circot.model import CIRCoT

    torch.set_num_threads(1)
    model = CIRCoT.tiny(
        tokenizer=qwen_tokenizer,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vision_embed_dim=32,
        vision_depth=1,
        tie_word_embeddings=True,
        max_cot_tokens=6,
    )
    assert model.hf.get_input_embeddings().weight.shape[0] == len(qwen_tokenizer)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]
    texts = ["make the dog red", "remove the hat"]
    full, cots = model.encode_queries(images, texts, mode="full", return_reasoning=True)
    assert full.shape == (2, 32) and all(c is not None for c in cots)
    gallery = model.encode_images(images)
    np.testing.assert_allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    loaded = CIRCoT.from_pretrained(model.save_pretrained(tmp_path / "qwen-tiny"))
    assert loaded.tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    np.testing.assert_array_equal(loaded.encode_queries(images, texts, mode="full"), full)

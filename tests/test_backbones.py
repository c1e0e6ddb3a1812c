"""configs/backbones: the published shapes of real checkpoints, and CIRCoT.from_config building them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

BACKBONES = Path(__file__).resolve().parents[1] / "configs" / "backbones"
# parameter counts as the checkpoints' model pages give them (billions, two decimals)
PUBLISHED = {
    "qwen2-vl-2b": (2.21, 1536, 28),
    "qwen2.5-vl-3b": (3.75, 2048, 36),
    "qwen2.5-vl-7b": (8.29, 3584, 28),
    "qwen3-vl-2b": (2.13, 2048, 28),
    "qwen3-vl-4b": (4.44, 2560, 36),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_backbone_config_has_the_published_size(name):
    import transformers
    from transformers import AutoConfig

    data = json.loads((BACKBONES / f"{name}.json").read_text())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = getattr(transformers, data["architectures"][0])(config)
    billions, hidden, layers = PUBLISHED[name]
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    text = config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (hidden, layers)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) * 2 == head_dim


def test_every_backbone_file_is_covered():
    assert sorted(p.stem for p in BACKBONES.glob("*.json")) == sorted(PUBLISHED)


def _shrunk(name: str) -> dict:
    """A backbone file with every size cut down: the same code path at test size."""
    data = json.loads((BACKBONES / f"{name}.json").read_text())
    text = data.get("text_config", data)
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    text.update(num_key_value_heads=1, vocab_size=4096)
    if "head_dim" in text:
        text["head_dim"] = 32
    text["rope_scaling"]["mrope_section"] = [6, 5, 5] if "head_dim" in text else [4, 6, 6]
    vision = data["vision_config"]
    vision.update(depth=2, num_heads=2)
    for key in ("hidden_size", "embed_dim", "out_hidden_size"):
        if key in vision:
            vision[key] = 64
    for key, value in (
        ("intermediate_size", 128),
        ("fullatt_block_indexes", [1]),
        ("deepstack_visual_indexes", [0]),
    ):
        if key in vision:
            vision[key] = value
    return data


@pytest.mark.parametrize("name", ["qwen2-vl-2b", "qwen2.5-vl-3b", "qwen3-vl-2b"])
def test_from_config_builds_seeded_random_weights_of_that_shape(name, tmp_path):
    from PIL import Image

    from circot.model import CIRCoT

    torch.set_num_threads(1)
    data = _shrunk(name)
    a = CIRCoT.from_config(data, image_size=64, max_cot_tokens=8)
    b = CIRCoT.from_config(data, image_size=64)
    c = CIRCoT.from_config(data, image_size=64, seed=1)
    assert a.dtype == torch.bfloat16 and a.hf.config.model_type == data["model_type"]
    assert a.hf.get_input_embeddings().weight.shape[0] == 4096  # the config's vocabulary, not the tokenizer's
    wa, wb, wc = (m.hf.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert all(torch.isfinite(p.float()).all() for p in a.hf.parameters())
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    emb = a.encode_images([image, image])
    assert emb.shape == (2, 64) and abs(emb[0] - emb[1]).max() == 0
    # a saved build reloads as a circot model directory, LoRA over it as a user's config asks
    a.save_pretrained(tmp_path / "base")
    lora = CIRCoT.from_pretrained(tmp_path / "base", lora={"r": 4, "alpha": 8})
    assert lora.is_lora and abs(lora.encode_images([image]) - emb[:1]).max() < 1e-6


def test_from_config_errors_name_the_problem(tmp_path):
    from circot.errors import ConfigError
    from circot.model import CIRCoT

    with pytest.raises(ConfigError, match="cannot read a model config"):
        CIRCoT.from_config(tmp_path / "missing.json")
    data = _shrunk("qwen2.5-vl-3b")
    data["vocab_size"] = 100
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        CIRCoT.from_config(data)

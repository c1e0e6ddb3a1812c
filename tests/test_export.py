"""`circot export`: the exports reload with plain transformers (and peft) and compute what the model does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from circot import prompts
from circot.config import LoRASettings
from circot.model import CIRCoT
from retrieval_fakes import TINY, write_images

TEXTS = ["make the circle red", "add a small star"]
COT = {"caption": "a blue circle", "reasoning": "it turns red", "conclusion": "a red circle"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 2, size=24)
    return sorted(str(p) for p in folder.glob("*.png"))


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return CIRCoT.tiny(seed=0, **TINY).save_pretrained(tmp_path_factory.mktemp("full") / "model")


@pytest.fixture(scope="module")
def lora_dir(full_dir, tmp_path_factory):
    """A LoRA model whose adapter and circot token rows are not zero (as after training)."""
    model = CIRCoT.from_pretrained(full_dir, lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.save_pretrained(tmp_path_factory.mktemp("lora") / "model")


def _inputs(model: CIRCoT, images) -> dict:
    batch = model.build_batch(images, texts=TEXTS, mode="full", cots=[COT, COT])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    inputs["mm_token_type_ids"] = (batch["input_ids"] == model.image_token_id).to(torch.int)
    return inputs


def _logits(hf, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return hf(**inputs).logits


def _check_served_files(folder, model):
    """What an engine reads: a tokenizer with circot's tags and the chat template, the image processor, and
    processor files naming a transformers class (loading the whole processor needs torchvision for its video
    half, which an engine has and this environment may not)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert all(t in tokenizer.get_vocab() for t in prompts.SPECIAL_TOKENS)
    assert (folder / "chat_template.jinja").read_text() == prompts.CHAT_TEMPLATE
    instruction = prompts.user_instruction("full", TEXTS[0])
    rendered = tokenizer.apply_chat_template(
        prompts.chat_messages(instruction), tokenize=False, add_generation_prompt=True
    )
    assert rendered == prompts.render_prompt(instruction, 1)
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    image_processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    assert image_processor.size == model.images.image_processor.size


@pytest.mark.parametrize("source", ["full", "lora"])
def test_merged_export_reloads_with_transformers_and_gives_the_same_logits(
    source, full_dir, lora_dir, images, tmp_path, cli
):
    from transformers import Qwen2VLForConditionalGeneration

    model_dir = full_dir if source == "full" else lora_dir
    model = CIRCoT.from_pretrained(model_dir)
    assert model.is_lora == (source == "lora")
    code, out, err = cli("export", "--model", model_dir, "--out", tmp_path / "served", "--merged")
    assert code == 0, err
    assert "vllm serve" in out
    folder = tmp_path / "served"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert json.loads((folder / "circot_export.json").read_text())["kind"] == "merged"
    _check_served_files(folder, model)

    inputs = _inputs(model, images)
    reloaded = Qwen2VLForConditionalGeneration.from_pretrained(str(folder)).eval()
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(model.model, inputs), atol=1e-4, rtol=1e-4)
    # the folder is a circot model too (the local pooling pass), embedding as the source does
    again = CIRCoT.from_pretrained(folder)
    assert not again.is_lora
    np.testing.assert_allclose(again.encode_images(images), model.encode_images(images), atol=1e-5)
    np.testing.assert_allclose(
        again.encode_queries(images, TEXTS, mode="full", cots=[COT, COT]),
        model.encode_queries(images, TEXTS, mode="full", cots=[COT, COT]),
        atol=1e-5,
    )


def test_adapter_export_is_a_base_with_circot_tokens_and_a_plain_lora(lora_dir, images, tmp_path, cli):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import Qwen2VLForConditionalGeneration

    model = CIRCoT.from_pretrained(lora_dir)
    code, out, err = cli("export", "--model", lora_dir, "--out", tmp_path / "served", "--adapter")
    assert code == 0, err
    assert "--enable-lora --lora-modules circot=" in out
    folder = tmp_path / "served"
    _check_served_files(folder / "base", model)
    _check_served_files(folder / "adapter", model)
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] is None and config["base_model_name_or_path"] == str(
        (folder / "base").resolve()
    )
    with safe_open(str(folder / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)

    inputs = _inputs(model, images)
    base = Qwen2VLForConditionalGeneration.from_pretrained(str(folder / "base")).eval()
    served = PeftModel.from_pretrained(base, str(folder / "adapter")).eval()
    torch.testing.assert_close(_logits(served, inputs), _logits(model.model, inputs), atol=1e-4, rtol=1e-4)


def test_export_refuses_what_it_cannot_write(full_dir, tmp_path, cli):
    code, _, err = cli("export", "--model", full_dir, "--out", tmp_path / "a", "--adapter")
    assert code == 2 and "--adapter needs a LoRA model" in err and not (tmp_path / "a").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, _, err = cli("export", "--model", full_dir, "--out", other)
    assert code == 2 and "is not an earlier export" in err
    assert (other / "notes.txt").read_text() == "keep me"
    code, _, err = cli("export", "--model", full_dir, "--out", tmp_path / "b", "--merged", "--adapter")
    assert code == 2 and "choose one of" in err

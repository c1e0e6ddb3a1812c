"""The shapes teacher (gold CoT) and the hf teacher (a tiny random Qwen2.5-VL built from a config)."""

from __future__ import annotations

import pytest

from circot.annotate import read_annotations, rejects_path
from circot.annotate.pipeline import annotate_split
from circot.annotate.store import iter_jsonl


def test_shapes_teacher_writes_the_gold_cot(tmp_path, cli):
    from circot.data.shapes import generate, gold_cot, load

    root = generate(tmp_path / "shapes", seed=0, n_train=16, n_val=4, n_test=4, n_novel=4, image_size=32)
    out = tmp_path / "shapes.jsonl"
    code, stdout, err = cli(
        "annotate", "--dataset", "shapes", "--root", root, "--split", "train", "--teacher", "shapes", "--out", out
    )  # fmt: skip
    assert code == 0, err
    split = load(root, "train")
    cots = read_annotations(out)
    assert set(cots) == {q.query_id for q in split.queries}  # the gold CoT passes quality control
    for query in split.queries:
        gold = gold_cot(query)
        assert (cots[query.query_id].caption, cots[query.query_id].conclusion) == (
            gold.caption,
            gold.conclusion,
        )
    assert {rec["teacher"] for _, rec in iter_jsonl(out)} == {"shapes:gold"}


def _tiny_qwen(path):
    """A tiny random Qwen2.5-VL with a word-level tokenizer and a Qwen-style chat template, saved to ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    from circot.annotate import prompts as P

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "[UNK]"]  # fmt: skip
    words = " ".join(
        [P.SYSTEM, P.CAPTION, P.REASONING, P.CONCLUSION_GROUNDED, P.VERIFY, "red dress blue shirt"]
    )
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=specials))
    tok.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}{% if c.type == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        },
        vision_config={
            "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [0],
            "window_size": 56,
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(path)
    return path


def test_hf_teacher_with_a_tiny_random_qwen(tmp_path, tiny_split):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from circot.annotate.teachers import build_teacher

    model_dir = _tiny_qwen(tmp_path / "tiny-qwen")
    teacher = build_teacher("hf", model=str(model_dir), max_tokens=6, batch_size=4)
    out = tmp_path / "hf.jsonl"
    report = annotate_split(tiny_split, teacher, out, concurrency=4, limit=6, verify=True)
    backend = teacher.backend
    # every triplet is accounted for: a random model writes gibberish, so most or all are rejected
    records = [rec["query_id"] for _, rec in iter_jsonl(out)]
    rejects = [rec for _, rec in iter_jsonl(rejects_path(out))] if rejects_path(out).exists() else []
    assert sorted(records + [r["query_id"] for r in rejects]) == [q.query_id for q in tiny_split.queries[:6]]
    assert report.written + report.rejected == 6 and report.failed == 0
    assert all(r["teacher"] == "hf:tiny-qwen" and r["reason"] for r in rejects)
    assert backend.stats.successes >= 3 * 6  # three stages (plus re-asks) per triplet, all generated
    assert backend.batches < backend.stats.requests  # requests of concurrent triplets were batched
    assert report.teacher_stats["completion_tokens"] > 0

"""CIRCoT on tiny random Qwen2-VL / Qwen2.5-VL models built from configs (no weights, no hub)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from circot import prompts
from circot.config import CIRCoTConfig
from circot.errors import CircotError
from circot.model import CIRCoT, default_model_path
from circot.prompts import CoT

CORPUS = [
    "a small red circle left of a big blue square",
    "make the circle green and move it to the right",
    "remove the small yellow triangle",
    "the big purple star above the green square is replaced by a red circle",
    "add a blue triangle below the circle",
    "two circles and one square; the target has three objects",
] * 5
TEXTS = ["make it red", "remove the small yellow triangle on the left please", "add a star", "swap them"]
COT = {"caption": "a red circle", "reasoning": "make the circle green", "conclusion": "a green circle"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def _tiny(model_type: str) -> CIRCoT:
    return CIRCoT.tiny(tokenizer_corpus=CORPUS, model_type=model_type, max_cot_tokens=12)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def model(request) -> CIRCoT:
    """A tiny random model of each supported backbone class."""
    return _tiny(request.param)


@pytest.fixture(scope="module")
def qwen2() -> CIRCoT:
    """The tiny Qwen2-VL only (for tests that need one backbone)."""
    return _tiny("qwen2_vl")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    out: list = []
    for i in range(4):
        im = Image.fromarray(rng.integers(0, 255, (100 + 10 * i, 120, 3), dtype=np.uint8))
        if i % 2:
            path = root / f"im{i}.png"
            im.save(path)
            out.append(path)
        else:
            out.append(im)
    return out


def _script(model: CIRCoT, text: str, monkeypatch) -> None:
    """Make generation write ``text`` token by token (then junk), whatever the weights say; the real decoding
    loop runs around the scripted choices."""
    junk = model.tokenizer(" circle", add_special_tokens=False)["input_ids"]
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"] + junk * 50
    real_decode = model._decode_steps
    step = [0]

    def next_token(logits, generator=None):
        tok = torch.full(logits.shape[:1], ids[step[0]], dtype=torch.long, device=logits.device)
        step[0] += 1
        return tok

    def decode(*args, **kwargs):
        step[0] = 0
        yield from real_decode(*args, **kwargs)

    monkeypatch.setattr(model, "_next_token", next_token)
    monkeypatch.setattr(model, "_decode_steps", decode)
    monkeypatch.setattr(model.config, "max_cot_tokens", len(ids))


def test_embeddings_are_normalised_float32(model, images):
    g = model.encode_images(images, batch_size=3)
    q = model.encode_queries(images, TEXTS, mode="fast")
    f = model.encode_queries(images, TEXTS, mode="full")
    for e in (g, q, f):
        assert e.dtype == np.float32 and e.shape == (4, model.embedding_dim)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(q, f)


def test_batched_equals_one_by_one_despite_left_padding(model, images):
    for mode in ("fast", "full"):
        batched = model.encode_queries(images, TEXTS, mode=mode, batch_size=4)
        single = np.concatenate(
            [model.encode_queries([im], [t], mode=mode) for im, t in zip(images, TEXTS, strict=True)]
        )
        np.testing.assert_allclose(batched, single, atol=1e-4)
    batched_cots = model.generate_reasoning(images, TEXTS, batch_size=4)
    single_cots = [model.generate_reasoning([im], [t])[0] for im, t in zip(images, TEXTS, strict=True)]
    assert [c.raw for c in batched_cots] == [c.raw for c in single_cots]
    g = model.encode_images(images, batch_size=4)
    np.testing.assert_allclose(g, np.concatenate([model.encode_images([im]) for im in images]), atol=1e-4)


def test_full_mode_returns_parsed_cot_and_matches_given_cot(qwen2, images, monkeypatch):
    text = prompts.format_cot(COT)  # ends with <emb>; the script goes on with junk after it
    _script(qwen2, text, monkeypatch)
    emb, cots = qwen2.encode_queries(images[:2], TEXTS[:2], mode="full", return_reasoning=True)
    assert all(c.well_formed for c in cots), cots[0].problems
    assert (cots[0].caption, cots[0].reasoning, cots[0].conclusion) == tuple(COT.values())
    monkeypatch.undo()
    given = qwen2.encode_queries(images[:2], TEXTS[:2], mode="full", cots=[COT, CoT(**COT)])
    np.testing.assert_allclose(emb, given, atol=1e-5)


def test_missing_emb_is_appended_and_flagged(qwen2, images, monkeypatch):
    _script(qwen2, "<caption>a red circle</caption><reasoning>x", monkeypatch)
    emb, cots = qwen2.encode_queries(images[:1], TEXTS[:1], mode="full", return_reasoning=True)
    assert not cots[0].well_formed and "no <emb>" in cots[0].problems
    assert cots[0].caption == "a red circle"
    np.testing.assert_allclose(np.linalg.norm(emb), 1.0, atol=1e-5)


def test_fast_mode_generates_nothing(qwen2, images, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("fast mode must not generate")

    monkeypatch.setattr(qwen2, "_decode_steps", boom)
    emb, cots = qwen2.encode_queries(images, TEXTS, mode="fast", return_reasoning=True)
    assert emb.shape == (4, qwen2.embedding_dim) and cots == [None] * 4


@pytest.mark.parametrize("rule", ["at_emb", "before_emb"])
def test_extraction_rule_matches_a_manual_forward_pass(model, images, rule):
    """Against transformers' own forward from pixels (for Qwen3-VL: with its deep-stack features)."""
    model.config.extraction = rule
    try:
        got = model.encode_queries(images[:1], TEXTS[:1], mode="fast")[0]
    finally:
        model.config.extraction = "at_emb"
    # the same prompt, run through the stock transformers forward (its own rotary index)
    pixels, grids = model.images(images[:1])
    n_img = int(grids.prod() // 4)
    text = prompts.render_prompt(prompts.query_instruction(TEXTS[0], "fast"), n_img) + prompts.EMB_TOKEN
    ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert int(ids[0, -1]) == model.emb_token_id
    with torch.no_grad():
        out = model.hf.model(
            input_ids=ids,
            pixel_values=pixels,
            image_grid_thw=grids,
            mm_token_type_ids=(ids == model.image_token_id).int(),
        )
    pos = -1 if rule == "at_emb" else -2
    want = torch.nn.functional.normalize(out.last_hidden_state[0, pos], dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_qwen3_deepstack_features_reach_the_decoder(images):
    """Qwen3-VL's deep-stack features change the embedding (zeroing them is not the same model); its
    QK-norm decoder steps run through transformers' forward, not the lean decoder."""
    from circot.model import _LeanDecoder

    model = _tiny("qwen3_vl").eval()
    assert model.has_deepstack and not _LeanDecoder.supports(model.hf)
    batch = model.build_batch(images[:2], TEXTS[:2], mode="fast")
    with torch.no_grad():
        image_out = model._image_features(batch["pixel_values"], batch["image_grid_thw"])
        assert len(image_out.deepstack_features) == len(
            model.hf.config.vision_config.deepstack_visual_indexes
        )
        full = model._hidden(batch["input_ids"], batch["attention_mask"], batch["position_ids"], image_out)
        image_out.deepstack_features = [
            tuple(torch.zeros_like(f) for f in lvl) for lvl in image_out.deepstack_features
        ]
        zeroed = model._hidden(batch["input_ids"], batch["attention_mask"], batch["position_ids"], image_out)
    assert not torch.allclose(full, zeroed)


def test_build_batch_labels_only_the_cot_answer(qwen2, images):
    batch = qwen2.build_batch(images[:2], TEXTS[:2], cots=[COT, COT], mode="full")
    answer = qwen2.tokenizer(prompts.format_cot(COT), add_special_tokens=False)["input_ids"]
    for row in range(2):
        labels = batch["labels"][row]
        kept = labels[labels != -100].tolist()
        assert kept == answer and kept[-1] == qwen2.emb_token_id
        # the supervised tokens are the tail of the sequence, prompt and padding are ignored
        assert labels[-len(answer) :].tolist() == answer
        assert batch["input_ids"][row, -len(answer) :].tolist() == answer
    assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
    emb, logits = qwen2.embed_batch(batch)
    assert logits.shape == (*batch["input_ids"].shape, len(qwen2.tokenizer))
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    ) - (emb[0] @ emb[1])
    loss.backward()
    grad = qwen2.hf.get_input_embeddings().weight.grad
    assert grad is not None and grad[qwen2.emb_token_id].abs().sum() > 0
    qwen2.zero_grad(set_to_none=True)
    fast = qwen2.build_batch(images[:2], TEXTS[:2], mode="fast")
    assert bool((fast["labels"] == -100).all())
    assert qwen2.embed_batch(fast)[1] is None


def test_training_batches_embed_like_inference(qwen2, images):
    with torch.no_grad():
        gal, _ = qwen2.embed_batch(qwen2.build_batch(images, mode="gallery"))
        full, _ = qwen2.embed_batch(qwen2.build_batch(images, TEXTS, cots=[COT] * 4, mode="full"))
    np.testing.assert_allclose(gal.numpy(), qwen2.encode_images(images), atol=1e-5)
    np.testing.assert_allclose(full.numpy(), qwen2.encode_queries(images, TEXTS, cots=[COT] * 4), atol=1e-5)


def test_save_load_gives_identical_embeddings(model, images, tmp_path):
    out = model.save_pretrained(tmp_path / "m")
    for name in ("circot_config.json", "config.json", "model.safetensors", "README.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert "fingerprint" in (out / "README.md").read_text()
    assert json.loads((out / "circot_config.json").read_text())["versions"]["transformers"]
    loaded = CIRCoT.from_pretrained(out)
    assert loaded.fingerprint == model.fingerprint
    assert loaded.config.to_dict() == model.config.to_dict()
    np.testing.assert_array_equal(loaded.encode_images(images), model.encode_images(images))
    np.testing.assert_array_equal(
        loaded.encode_queries(images, TEXTS, mode="full"), model.encode_queries(images, TEXTS, mode="full")
    )
    model.save_pretrained(out)  # overwriting an existing directory works and leaves no temp folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_half_precision_storage_loads_back_in_float32(model, images, tmp_path):
    full = model.save_pretrained(tmp_path / "full")
    half = model.save_pretrained(tmp_path / "half", storage_dtype="fp16")
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(full)
    assert json.loads((half / "circot_config.json").read_text())["compute_dtype"] == "float32"
    loaded = CIRCoT.from_pretrained(half)
    assert loaded.dtype == torch.float32 and model.dtype == torch.float32  # the live model is untouched
    assert loaded.fingerprint in (half / "README.md").read_text()  # the card names the stored weights
    np.testing.assert_allclose(loaded.encode_images(images), model.encode_images(images), atol=2e-3)
    assert CIRCoT.from_pretrained(half, dtype="fp16").dtype == torch.float16  # an explicit dtype wins


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_lora_save_load_keeps_new_token_rows(model_type, images, tmp_path):
    from circot.config import LoRASettings

    qwen2 = _tiny(model_type)

    base_dir = qwen2.save_pretrained(tmp_path / "base")
    lora = CIRCoT.from_pretrained(base_dir, lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    assert lora.is_lora and 0 < lora.num_parameters(trainable_only=True) < lora.num_parameters() / 2
    before = lora.encode_queries(images, TEXTS, mode="fast")
    # a "training step": move every trainable tensor (LoRA matrices and the circot token rows)
    with torch.no_grad():
        for name, p in lora.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
                assert "lora_" in name or "trainable_tokens" in name, name
    after = lora.encode_queries(images, TEXTS, mode="fast")
    assert not np.allclose(before, after)
    out = lora.save_pretrained(tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    reloaded = CIRCoT.from_pretrained(out)
    assert reloaded.is_lora and reloaded.fingerprint == lora.fingerprint
    np.testing.assert_allclose(reloaded.encode_queries(images, TEXTS, mode="fast"), after, atol=1e-6)
    emb_row = reloaded.hf.get_input_embeddings()(torch.tensor([reloaded.emb_token_id]))
    base_row = qwen2.hf.get_input_embeddings()(torch.tensor([qwen2.emb_token_id]))
    assert not torch.allclose(emb_row, base_row)


def test_gradient_checkpointing_switch(qwen2, images):
    qwen2.set_gradient_checkpointing(True)
    try:
        qwen2.train()
        emb, _ = qwen2.embed_batch(qwen2.build_batch(images[:2], mode="gallery"))
        emb.sum().backward()
        assert qwen2.hf.model.language_model.gradient_checkpointing
    finally:
        qwen2.eval()
        qwen2.set_gradient_checkpointing(False)
        qwen2.zero_grad(set_to_none=True)
    assert not qwen2.config.gradient_checkpointing


def test_stream_reasoning_yields_the_generated_text(qwen2, images, monkeypatch):
    _script(qwen2, prompts.format_cot(COT), monkeypatch)
    pieces = list(qwen2.stream_reasoning(images[0], TEXTS[0]))
    assert len(pieces) > 3 and "".join(pieces) == prompts.format_cot(COT, with_emb=False)


def test_fingerprint_changes_with_weights(qwen2):
    fp = qwen2.fingerprint
    assert fp == qwen2.fingerprint and len(fp) == 16
    w = qwen2.hf.lm_head.weight
    with torch.no_grad():
        w[0, 0] += 1.0
    try:
        assert qwen2.fingerprint != fp
    finally:
        with torch.no_grad():
            w[0, 0] -= 1.0


def test_user_errors_are_one_line(qwen2, images, tmp_path):
    with pytest.raises(CircotError, match="mode"):
        qwen2.encode_queries(images, TEXTS, mode="slow")
    with pytest.raises(CircotError, match="texts"):
        qwen2.encode_queries(images, TEXTS[:2])
    with pytest.raises(CircotError, match="missing.png"):
        qwen2.encode_images([tmp_path / "missing.png"])
    with pytest.raises(CircotError, match="not a model directory"):
        CIRCoT.from_pretrained(tmp_path)


def test_default_model_missing_is_a_clear_error(tmp_path, monkeypatch):
    import circot.loading

    monkeypatch.setattr(circot.loading, "default_model_path", lambda: tmp_path / "no-such-model")
    with pytest.raises(CircotError, match="shipped model"):
        CIRCoT.from_pretrained(None)


def test_shipped_model_loads_and_embeds():
    assert (default_model_path() / "circot_config.json").is_file()
    model = CIRCoT.from_pretrained(None)
    emb = model.encode_images([Image.new("RGB", (112, 112), "white")])
    assert emb.shape == (1, model.embedding_dim)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)


def test_config_round_trip(tmp_path):
    cfg = CIRCoTConfig(extraction="before_emb", lora={"r": 8, "alpha": 16}, min_pixels=100, max_pixels=200)
    path = cfg.save(tmp_path / "c.json")
    assert CIRCoTConfig.load(path) == cfg and cfg.lora.r == 8
    assert CIRCoTConfig.from_dict(cfg.to_dict()) == cfg
    from circot.errors import ConfigError

    with pytest.raises(ConfigError, match="extraction"):
        CIRCoTConfig(extraction="mean")
    with pytest.raises(ConfigError, match="unknown"):
        CIRCoTConfig.from_dict({"nope": 1})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json"):
        CIRCoTConfig.load(tmp_path / "bad.json")


def test_lean_decoding_matches_transformers_steps(model, images):
    """The lean one-token steps give the same tokens as transformers' own forward with its KV cache."""
    model.config.max_cot_tokens = 20
    try:
        lean = model.generate_reasoning(images, TEXTS, batch_size=4)
        model.lean_decoding = False
        stock = model.generate_reasoning(images, TEXTS, batch_size=4)
    finally:
        model.lean_decoding = True
        model.config.max_cot_tokens = 12
    assert [c.raw for c in lean] == [c.raw for c in stock]
    assert len(set(c.raw for c in lean)) > 1


def test_encoding_in_train_mode_is_deterministic_and_keeps_the_mode(qwen2, images):
    want = qwen2.encode_queries(images[:2], TEXTS[:2], mode="full")
    qwen2.train()
    try:
        np.testing.assert_allclose(qwen2.encode_queries(images[:2], TEXTS[:2], mode="full"), want, atol=1e-6)
        assert "".join(qwen2.stream_reasoning(images[0], TEXTS[0])) is not None
        assert qwen2.training and qwen2.hf.training
    finally:
        qwen2.eval()


def _decode_then_pool(model: CIRCoT, images, texts) -> np.ndarray:
    """The reference for full mode: generate, close the answer with <emb>, then one forward over it all."""
    with model._inference():
        pixels, grids = model.images(images)
        image_out = model._image_features(pixels, grids)
        prompt_ids = model._prompt_ids("full", texts, model.images.n_tokens(grids))
        steps = list(
            model._decode_steps(model._pad(prompt_ids, grids), image_out, model.config.max_cot_tokens)
        )
        generated = torch.stack(steps, dim=1).tolist()
        seqs = [
            p + prompts.close_with_emb(g, model.emb_token_id, model.stop_token_ids)
            for p, g in zip(prompt_ids, generated, strict=True)
        ]
        return model._pool(model._pad(seqs, grids), image_out).numpy()


@pytest.mark.parametrize("rule", ["at_emb", "before_emb"])
@pytest.mark.parametrize("lean", [True, False])
def test_full_mode_takes_emb_from_the_decoding_loop_like_a_second_forward(model, images, rule, lean):
    """Rows that write <emb>, stop, or run out of tokens, batched with left padding and one by one."""
    model.config.extraction, model.lean_decoding = rule, lean
    try:
        want = _decode_then_pool(model, images, TEXTS)
        batched = model.encode_queries(images, TEXTS, mode="full", batch_size=4)
        single = np.concatenate(
            [model.encode_queries([im], [t], mode="full") for im, t in zip(images, TEXTS, strict=True)]
        )
    finally:
        model.config.extraction, model.lean_decoding = "at_emb", True
    np.testing.assert_allclose(batched, want, atol=1e-5)
    np.testing.assert_allclose(single, want, atol=1e-4)


def test_shipped_model_full_mode_closing_state_matches_a_second_forward(tmp_path):
    """On shapes scenes the shipped model writes <emb> itself, at different steps per row of a padded batch."""
    from circot.data import shapes

    split = shapes.load(shapes.generate(tmp_path, seed=11, n_train=0, n_val=4, n_test=0, n_novel=0), "val")
    refs = [split.image_path(q.reference) for q in split.queries[:4]]
    texts = [q.text for q in split.queries[:4]]
    model = CIRCoT.from_pretrained(None, fast_weight=0.0)  # the CoT's <emb> state alone
    want = _decode_then_pool(model, refs, texts)
    emb, cots = model.encode_queries(refs, texts, mode="full", batch_size=4, return_reasoning=True)
    assert all(c.well_formed for c in cots) and len({len(c.token_ids) for c in cots}) > 1
    np.testing.assert_allclose(emb, want, atol=1e-4)


def test_lean_decoder_falls_back_when_transformers_internals_are_missing(qwen2, images, monkeypatch):
    """A release without the internals the lean steps read decodes through transformers' forward instead."""
    from circot.model import _LeanDecoder

    qwen2.eval()
    assert _LeanDecoder.supports(qwen2.hf)
    want = qwen2.encode_queries(images[:2], TEXTS[:2], mode="full")
    rotary = qwen2.hf.model.language_model.rotary_emb
    monkeypatch.delattr(type(rotary), "attention_scaling", raising=False)
    monkeypatch.delattr(rotary, "attention_scaling")
    assert not _LeanDecoder.supports(qwen2.hf)
    monkeypatch.undo()
    assert not _LeanDecoder.cache_supported(object())
    monkeypatch.setattr(_LeanDecoder, "cache_supported", staticmethod(lambda cache: False))
    monkeypatch.setattr(
        _LeanDecoder, "step", lambda *a: (_ for _ in ()).throw(AssertionError("lean step used"))
    )
    np.testing.assert_allclose(qwen2.encode_queries(images[:2], TEXTS[:2], mode="full"), want, atol=1e-5)


def test_stream_reasoning_hands_back_the_full_mode_embedding(model, images):
    model.eval()
    for image, text in zip(images[:2], TEXTS[:2], strict=True):
        out: dict = {}
        streamed = "".join(model.stream_reasoning(image, text, embedding=out))
        want, cots = model.encode_queries([image], [text], mode="full", return_reasoning=True)
        assert cots[0].raw.startswith(streamed)
        np.testing.assert_allclose(out["embedding"], want[0], atol=1e-5)


def test_a_generated_cot_given_back_embeds_as_generated(model, images):
    """The one query path: a generated CoT handed back (as the eval cache does) embeds from its own tokens."""
    emb, cots = model.encode_queries(images, TEXTS, mode="full", return_reasoning=True)
    assert all(c.token_ids for c in cots)
    np.testing.assert_allclose(model.encode_queries(images, TEXTS, mode="full", cots=cots), emb, atol=1e-5)
    from circot.search import embed_queries

    q = embed_queries(model, images, TEXTS, "full", batch_size=4)
    np.testing.assert_allclose(q.embeddings, emb, atol=1e-5)
    assert q.generated == [True] * 4 and [c.raw for c in q.cots] == [c.raw for c in cots]


def test_fast_weight_blends_the_fast_embedding_into_full_mode(model, images):
    """fast_weight w: full mode embeds (1 - w) * cot + w * fast, renormalised, on every path (generated, given,
    streamed); 0 leaves the CoT's embedding alone, and the fingerprint (so an index's validity) ignores w."""
    model.eval()
    fp = model.fingerprint
    cot_emb, cots = model.encode_queries(images, TEXTS, mode="full", return_reasoning=True)
    fast = model.encode_queries(images, TEXTS, mode="fast")
    want = 0.7 * cot_emb + 0.3 * fast
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    model.config.fast_weight = 0.3
    try:
        assert model.fingerprint == fp
        np.testing.assert_allclose(model.encode_queries(images, TEXTS, mode="full"), want, atol=1e-5)
        np.testing.assert_allclose(
            model.encode_queries(images, TEXTS, mode="full", cots=cots), want, atol=1e-5
        )
        np.testing.assert_allclose(model.encode_queries(images, TEXTS, mode="fast"), fast, atol=1e-6)
        out: dict = {}
        "".join(model.stream_reasoning(images[1], TEXTS[1], embedding=out))
        np.testing.assert_allclose(out["embedding"], want[1], atol=1e-5)
        assert not np.allclose(want, cot_emb, atol=1e-3)  # the blend moved the embeddings
    finally:
        model.config.fast_weight = 0.0


def test_cot_samples_average_sampled_cots_into_the_greedy_one(model, images):
    """cot_samples k: a generated query embeds the mean of its greedy CoT's and k sampled CoTs' ``<emb>``
    embeddings, renormalised: the same on the batched and the streamed path, alone or in any batch, and from run
    to run. The CoT shown is
    the greedy one, a given CoT embeds alone, and samples at a temperature near 0 (the greedy CoT k more times)
    leave the embedding as it was. The fingerprint (so an index's validity) ignores k."""
    model.eval()
    fp = model.fingerprint
    greedy, cots = model.encode_queries(images, TEXTS, mode="full", return_reasoning=True)
    cfg = model.config
    cfg.cot_samples = 2
    try:
        assert model.fingerprint == fp
        cfg.sampling_temperature = 1e-7
        np.testing.assert_allclose(model.encode_queries(images, TEXTS, mode="full"), greedy, atol=1e-5)
        cfg.sampling_temperature = 1.0
        got, shown = model.encode_queries(images, TEXTS, mode="full", return_reasoning=True)
        assert [c.raw for c in shown] == [c.raw for c in cots]
        # each generated CoT carries its own embedding and its samples, each with its own (cot_choice reads them):
        # the query's embedding is their renormalised mean, and a sample embeds from its tokens as given
        assert all(len(c.samples) == 2 and not c.samples[0].samples for c in shown)
        np.testing.assert_allclose(np.stack([c.embedding for c in shown]), greedy, atol=1e-5)
        total = np.stack([c.embedding + c.samples[0].embedding + c.samples[1].embedding for c in shown])
        np.testing.assert_allclose(got, total / np.linalg.norm(total, axis=1, keepdims=True), atol=1e-5)
        np.testing.assert_allclose(
            model.encode_queries(images, TEXTS, mode="full", cots=[c.samples[1] for c in shown]),
            np.stack([c.samples[1].embedding for c in shown]),
            atol=1e-5,
        )
        assert not np.allclose(got, greedy, atol=1e-3)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(model.encode_queries(images, TEXTS, mode="full"), got)
        np.testing.assert_allclose(
            model.encode_queries(images, TEXTS, mode="full", cots=cots), greedy, atol=1e-5
        )
        one = model.encode_queries(images[1], TEXTS[1], mode="full")
        out: dict = {}
        "".join(model.stream_reasoning(images[1], TEXTS[1], embedding=out))
        np.testing.assert_allclose(out["embedding"], one, atol=1e-5)
        assert not np.allclose(one, greedy[1], atol=1e-3)
        # a query's samples are its own: alone, or in a batch with other queries, it embeds the same
        np.testing.assert_allclose(one, got[1], atol=1e-5)
        np.testing.assert_allclose(
            model.encode_queries(images[::-1], TEXTS[::-1], mode="full")[::-1], got, atol=1e-5
        )
    finally:
        cfg.cot_samples, cfg.sampling_temperature = 0, 1.0


@pytest.mark.parametrize("field,bad", [("cot_samples", -1), ("cot_samples", True), ("cot_samples", 1.5),
                                       ("sampling_temperature", 0.0)])  # fmt: skip
def test_cot_samples_and_sampling_temperature_are_checked(field, bad):
    from circot.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        CIRCoTConfig(**{field: bad})


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, True, "0.2"])
def test_fast_weight_out_of_range_is_a_config_error(bad):
    from circot.errors import ConfigError

    with pytest.raises(ConfigError, match="fast_weight"):
        CIRCoTConfig(fast_weight=bad)

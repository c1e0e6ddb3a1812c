"""Decoding: the generation loop of full mode and the lean one-token decoder it runs on.

:func:`decode_steps` prefills the prompt through transformers' forward, then decodes greedily (or by sampling)
over the KV cache, one token a step, through :class:`_LeanDecoder` where the text decoder allows it; with
``embed`` it also feeds the closing ``<emb>`` and keeps its state, the query embedding of full mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from circot.model import _Seqs

# the lean decoder keeps concatenated copies of the projection weights only for models this small
FUSE_MAX_PARAMETERS = 200_000_000


def decode_steps(
    model: Any,
    seq: _Seqs,
    image_out: Any,
    max_new: int,
    embed: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> Iterator[torch.Tensor]:
    """Greedy (or sampled) decoding with the KV cache; yields the (b,) next tokens until all rows stop.
    ``generator``: sample from it (a list: one per row), whatever the config's ``do_sample``.

    The prompt is prefilled by the transformers model; the one-token steps run through
    :class:`_LeanDecoder` (same modules and weights, without transformers' per-call machinery) when the
    text decoder allows it, else through the transformers forward.

    ``embed``: a dict that receives ``"hidden"`` (b, hidden), each row's last-layer state at its closing
    ``<emb>`` (or just before it, by the extraction rule) — the state a forward over prompt + answer would
    give there, with the answer closed as :func:`circot.prompts.close_with_emb` closes it: a row that stops
    gets ``<emb>`` fed in place of its stop token, and a row that runs out of tokens gets it fed after its
    last one. So full mode needs no second forward.
    """
    dev = model.device
    ids, mask, pos = seq.input_ids.to(dev), seq.attention_mask.to(dev), seq.position_ids.to(dev)
    out = model._lm(ids, mask, pos, image_out, use_cache=True)
    cache, hidden = out.cache, out.last_hidden_state[:, -1]
    next_pos = pos.amax(dim=(0, 2)) + 1  # (b,)
    stops = torch.tensor((model.emb_token_id, *model.stop_token_ids), device=dev)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)
    ones = torch.ones((ids.shape[0], 1), dtype=mask.dtype, device=dev)
    closing = embed is not None
    before = closing and model.config.extraction == "before_emb"
    state = torch.zeros_like(hidden) if closing else None
    lean = (
        _LeanDecoder(model.hf, cache, mask, max_new + int(closing), fused_weights(model))
        if model.lean_decoding and _LeanDecoder.supports(model.hf) and _LeanDecoder.cache_supported(cache)
        else None
    )
    for step in range(max_new + int(closing)):
        if step < max_new:
            token = model._next_token(model.hf.lm_head(hidden), generator)
            token = torch.where(done, torch.full_like(token, model.pad_token_id), token)
            yield token
            finishing = ~done & torch.isin(token, stops)
        else:  # out of tokens: close with <emb>
            token = torch.full_like(token, model.pad_token_id)
            finishing = ~done
        done = done | finishing
        if not closing:
            if bool(done.all()) or step == max_new - 1:
                return
        else:
            if before:
                state[finishing] = hidden[finishing]
            if bool(done.all()) and (before or not bool(finishing.any())):
                break
            token = torch.where(finishing, torch.full_like(token, model.emb_token_id), token)
        if lean is not None:
            hidden = lean.step(token, next_pos)
        else:
            mask = torch.cat([mask, ones], dim=1)
            step_pos = next_pos.view(1, -1, 1).expand(3, -1, 1)
            out = model._lm(token[:, None], mask, step_pos, cache=cache, use_cache=True)
            cache, hidden = out.cache, out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
        if closing and not before:
            state[finishing] = hidden[finishing]
            if bool(done.all()):
                break
    if closing:
        embed["hidden"] = state


def fused_weights(model: Any) -> list | None:
    """Concatenated q|k|v and gate|up weights for the lean decoder (small models only; cached until the
    weights change)."""
    if model.num_parameters() > FUSE_MAX_PARAMETERS:
        return None
    version = sum(p._version for p in model.model.parameters())
    if model._fused is None or model._fused[0] != version:
        model._fused = (version, fused_decoder_weights(model.hf.model.language_model))
    return model._fused[1]


class _LeanDecoder:
    """One-token decoding steps of a Qwen2-VL / Qwen2.5-VL text decoder over a preallocated KV cache.

    Calls the model's own modules (norms, projections, MLPs — LoRA-wrapped or not) and does the attention
    with one ``scaled_dot_product_attention``; it skips transformers' mask building, output capturing and cache
    bookkeeping, which dominate the cost of a step for small models. For text tokens the three multimodal
    rotary sections share one position, so the rotary embedding is the ordinary one at that position.
    """

    _CLASSES = ("Qwen2VLTextModel", "Qwen2_5_VLTextModel")

    @classmethod
    def supports(cls, hf: nn.Module) -> bool:
        """Whether the text decoder is one this class knows and has every internal it reads (transformers'
        module layout changes between releases; without them decoding uses transformers' own forward)."""
        lm = getattr(getattr(hf, "model", None), "language_model", None)
        if lm is None or type(lm).__name__ not in cls._CLASSES or lm.training:
            return False
        cfg = lm.config
        if not all(t == "full_attention" for t in getattr(cfg, "layer_types", ["?"])):
            return False
        if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
            return False
        rotary, layers = getattr(lm, "rotary_emb", None), getattr(lm, "layers", None)
        if not (hasattr(rotary, "inv_freq") and hasattr(rotary, "attention_scaling") and layers):
            return False
        if not all(hasattr(getattr(lm, n, None), "weight") for n in ("embed_tokens", "norm")):
            return False
        layer = layers[0]
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        need = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")), (mlp, ("act_fn", "down_proj"))]
        need += [(layer, ("input_layernorm", "post_attention_layernorm"))]
        return all(hasattr(m, a) for m, names in need for a in names)

    @staticmethod
    def cache_supported(cache: Any) -> bool:
        """A prefill cache with per-layer ``keys`` / ``values`` tensors (transformers 5's ``DynamicCache``)."""
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(
            torch.is_tensor(getattr(layer, "keys", None)) and torch.is_tensor(getattr(layer, "values", None))
            for layer in layers
        )

    def __init__(
        self, hf: nn.Module, cache: Any, mask: torch.Tensor, max_new: int, fused: list | None = None
    ) -> None:
        lm = hf.model.language_model
        self.lm = lm
        self.fused = fused if fused is not None else [None] * len(lm.layers)
        cfg = lm.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.inv_freq = lm.rotary_emb.inv_freq
        self.rope_scale = lm.rotary_emb.attention_scaling
        b, length = mask.shape
        total = length + max_new
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # (b, kv heads, length, head_dim)
            kb = k.new_zeros(b, k.shape[1], total, k.shape[3])
            vb = v.new_zeros(b, v.shape[1], total, v.shape[3])
            kb[:, :, :length] = k
            vb[:, :, :length] = v
            self.keys.append(kb)
            self.values.append(vb)
        self.mask = torch.zeros(b, 1, 1, total, dtype=torch.bool, device=mask.device)
        self.mask[:, 0, 0, :length] = mask.bool()
        self.length = length

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` (b,) at rotary ``position`` (b,); returns the final-norm hidden state (b, hidden)."""
        lm, b, hd, nh, nkv = self.lm, token.shape[0], self.head_dim, self.n_heads, self.n_kv
        x = lm.embed_tokens(token[:, None])
        freqs = position[:, None].float() * self.inv_freq.to(x.device)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # (b, 1, 1, hd)
        cos = (angles.cos() * self.rope_scale).to(x.dtype)
        sin = (angles.sin() * self.rope_scale).to(x.dtype)
        t = self.length
        self.mask[:, :, :, t] = True
        mask = self.mask[:, :, :, : t + 1]
        for i, layer in enumerate(lm.layers):
            attn, fused = layer.self_attn, self.fused[i]
            h = self._norm(layer.input_layernorm, x)
            if fused is not None:
                qkv = F.linear(h, fused[0], fused[1]).view(b, 1, nh + 2 * nkv, hd)
            else:
                qkv = torch.cat((attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)), dim=-1).view(
                    b, 1, nh + 2 * nkv, hd
                )
            qk = qkv[:, :, : nh + nkv]
            qk = qk * cos + _rotate_half(qk) * sin  # (b, 1, heads, hd): rotary on queries and keys at once
            q = qk[:, :, :nh].transpose(1, 2)
            self.keys[i][:, :, t] = qk[:, 0, nh:]
            self.values[i][:, :, t] = qkv[:, 0, nh + nkv :]
            o = F.scaled_dot_product_attention(
                q,
                self.keys[i][:, :, : t + 1],
                self.values[i][:, :, : t + 1],
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=nh != nkv,
            )
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, 1, nh * hd))
            h = self._norm(layer.post_attention_layernorm, x)
            mlp = layer.mlp
            if fused is not None:
                gate, up = F.linear(h, fused[2]).chunk(2, dim=-1)
                x = x + mlp.down_proj(mlp.act_fn(gate) * up)
            else:
                x = x + mlp(h)
        self.length = t + 1
        return self._norm(lm.norm, x)[:, 0]

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; transformers' RMSNorm computes the same in float32
            return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
        return norm(x)


def fused_decoder_weights(
    lm: nn.Module,
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None]:
    """Per layer (q|k|v weight, q|k|v bias, gate|up weight) concatenated, or None where a projection is not a
    plain ``nn.Linear`` (e.g. LoRA-wrapped)."""
    out: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None] = []
    for layer in lm.layers:
        a, m = layer.self_attn, layer.mlp
        projs = (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)
        if any(type(p) is not nn.Linear for p in projs) or m.gate_proj.bias is not None:
            out.append(None)
            continue
        with torch.no_grad():
            w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
            bias = torch.cat(biases) if all(x is not None for x in biases) else None
            if bias is None and any(x is not None for x in biases):
                out.append(None)
                continue
            gu = torch.cat([m.gate_proj.weight, m.up_proj.weight])
        out.append((w, bias, gu))
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cut_at(generated: list[int], emb_id: int, stop_ids: Sequence[int]) -> list[int]:
    """Generated ids up to the first ``<emb>`` (kept) or stop token (dropped)."""
    for i, t in enumerate(generated):
        if t == emb_id:
            return generated[: i + 1]
        if t in stop_ids:
            return generated[:i]
    return generated

"""CIRCoTConfig: every choice that defines how a CIR-CoT model reasons and embeds, saved next to the weights."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from circot import prompts
from circot.errors import ConfigError

CONFIG_NAME = "circot_config.json"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASettings:
    """LoRA on the language model's linear layers (peft); the CoT/``<emb>`` token rows stay trainable too."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# which CoT full mode shows (CIRCoTConfig.cot_choice)
COT_CHOICES = ("greedy", "gallery")


@dataclass
class CIRCoTConfig:
    """How a CIR-CoT model is built, prompted and embedded. Round-trips through JSON (:meth:`save`/:meth:`load`).

    Prompt and token strings are recorded from :mod:`circot.prompts` (the single source of truth) so that a saved
    model describes itself; ``lora=None`` means full fine-tuning.
    """

    base_model: str = "tiny"
    model_type: str = "qwen2_vl"
    # prompts and tokens (recorded from circot.prompts)
    emb_token: str = prompts.EMB_TOKEN
    tags: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in prompts.TAGS.items()})
    system_prompt: str | None = prompts.SYSTEM_PROMPT
    gallery_instruction: str = prompts.GALLERY_INSTRUCTION
    query_instruction_full: str = prompts.QUERY_INSTRUCTION_FULL
    query_instruction_fast: str = prompts.QUERY_INSTRUCTION_FAST
    prompt_version: str = prompts.PROMPT_VERSION
    # embedding
    extraction: str = "at_emb"
    normalize: bool = True
    temperature: float = 0.05
    # full mode's query embedding blends in the same query's fast-mode embedding: (1 - w) * e_cot + w * e_fast,
    # renormalised when ``normalize``; 0 is the paper's rule (the state at the <emb> after the CoT alone)
    fast_weight: float = 0.0
    # full mode's generated queries also decode this many sampled CoTs (at ``sampling_temperature``) and embed the
    # mean of their <emb> embeddings and the greedy CoT's (self-consistency); 0: the greedy CoT alone
    cot_samples: int = 0
    # which of a generated query's CoTs is shown: "greedy", or "gallery": of the greedy CoT and its samples, the
    # one whose own <emb> embedding best matches a gallery image (a wrong conclusion tends to describe a scene the
    # gallery lacks). The query embedding is the same either way; it needs cot_samples > 0 and a gallery to search
    cot_choice: str = "greedy"
    # reasoning / generation
    max_cot_tokens: int = 128
    do_sample: bool = False
    sampling_temperature: float = 1.0
    top_p: float = 1.0
    # images
    min_pixels: int | None = None
    max_pixels: int | None = None
    # training
    lora: LoRASettings | None = None
    gradient_checkpointing: bool = False
    # storage: the dtype from_pretrained computes in when it is given none (set when the weights were saved in a
    # smaller float type than they were trained in; None: the dtype the weights are stored in)
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoRASettings(**self.lora)
        if self.extraction not in prompts.EXTRACTION_RULES:
            raise ConfigError(
                f"extraction must be one of {prompts.EXTRACTION_RULES}, got {self.extraction!r}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if (
            isinstance(self.fast_weight, bool)
            or not isinstance(self.fast_weight, (int, float))
            or not 0.0 <= self.fast_weight < 1.0
        ):
            raise ConfigError(f"fast_weight must be in [0, 1), got {self.fast_weight!r}")
        if (
            isinstance(self.cot_samples, bool)
            or not isinstance(self.cot_samples, int)
            or self.cot_samples < 0
        ):
            raise ConfigError(f"cot_samples must be an integer >= 0, got {self.cot_samples!r}")
        if self.cot_choice not in COT_CHOICES:
            raise ConfigError(f"cot_choice must be one of {COT_CHOICES}, got {self.cot_choice!r}")
        if self.sampling_temperature <= 0:
            raise ConfigError(f"sampling_temperature must be > 0, got {self.sampling_temperature}")
        if self.max_cot_tokens < 1:
            raise ConfigError(f"max_cot_tokens must be >= 1, got {self.max_cot_tokens}")
        if self.compute_dtype not in (None, *FLOAT_DTYPES):
            raise ConfigError(f"compute_dtype must be one of {FLOAT_DTYPES}, got {self.compute_dtype!r}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CIRCoTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"versions"})
        if unknown:
            raise ConfigError(f"unknown CIRCoTConfig field(s): {', '.join(unknown)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"invalid CIRCoTConfig: {exc}") from None

    def replace(self, **overrides: Any) -> CIRCoTConfig:
        """A copy with some fields changed (validated)."""
        return self.from_dict({**self.to_dict(), **overrides})

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write JSON atomically; ``extra`` (e.g. library versions) is stored beside the fields."""
        path = Path(path)
        data = self.to_dict()
        if extra:
            data.update(extra)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> CIRCoTConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data)

    def check_prompts(self) -> list[str]:
        """Fields whose recorded prompt/token strings differ from the current :mod:`circot.prompts`."""
        current = CIRCoTConfig()
        names = (
            "emb_token",
            "tags",
            "system_prompt",
            "gallery_instruction",
            "query_instruction_full",
            "query_instruction_fast",
        )
        return [n for n in names if getattr(self, n) != getattr(current, n)]

"""``circot export``: a circot model as a serving engine (vLLM, SGLang) loads it.

Two layouts, each written to a temporary folder next to the target and moved into place when complete:

- ``merged``: one transformers checkpoint (``config.json``, ``model.safetensors``) with a LoRA adapter merged
  into its base and circot's token rows in the embeddings and the LM head; the tokenizer (circot's tags as
  special tokens), the chat template (``chat_template.jinja``, the one :data:`circot.prompts.CHAT_TEMPLATE`
  that the local prompt follows), the image processor and ``circot_config.json`` (the folder is also a circot
  model: ``--model`` of ``circot eval`` / ``search`` / ``serve`` for the local pooling pass).
- ``adapter`` (LoRA models): ``base/``, the base checkpoint with circot's token rows (an engine's LoRA
  support adds no vocabulary), and ``adapter/``, the LoRA weights alone (peft format), each with the tokenizer
  and the chat template.

The processor files name the transformers processor class of the architecture (``Qwen2VLProcessor``, ...),
so that engines' ``AutoProcessor`` can load them. ``circot_export.json`` records what was exported.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from circot.errors import CircotError

logger = logging.getLogger(__name__)

KINDS = ("merged", "adapter")
MARKER = "circot_export.json"
_PROCESSOR_CLASSES = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}


def export_model(model_dir: str | Path | None, out: str | Path, kind: str = "merged") -> Path:
    """Export the circot model at ``model_dir`` (None: the shipped shapes model) to ``out`` as ``kind``.

    ``out`` is replaced as a whole when it holds an earlier export; a folder with other files is refused.
    """
    from circot.model import CIRCoT

    if kind not in KINDS:
        raise CircotError(f"export kind must be one of {', '.join(KINDS)}, not {kind!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise CircotError(f"--out {str(out)!r} exists and is not an earlier export; choose a new folder")
    model = CIRCoT.from_pretrained(None if model_dir is None else str(model_dir), device="cpu")
    if kind == "adapter" and not model.is_lora:
        raise CircotError(
            f"{model_dir}: --adapter needs a LoRA model (this one holds full weights); use --merged"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if kind == "merged":
            _write_merged(model, tmp)
        else:
            _write_adapter(model, tmp, out.resolve())
        record = {
            "kind": kind,
            "source": str(Path(model_dir).resolve()) if model_dir is not None else "shapes-tiny",
            "source_fingerprint": model.fingerprint,
            "model_type": model.config.model_type,
            "chat_template": "chat_template.jinja",
        }
        from circot.index import atomic_write_json

        atomic_write_json(tmp / MARKER, record)
        from circot.fileops import replace_directory

        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s model to %s", kind, out)
    return out


def _write_processor(model: Any, folder: Path) -> None:
    """Tokenizer, chat template and image processor, naming the architecture's transformers processor."""
    model.processor.save_pretrained(str(folder))
    model.images.image_processor.save_pretrained(str(folder))  # preprocessor_config.json, for older readers
    name = _PROCESSOR_CLASSES.get(model.config.model_type, "AutoProcessor")
    for file in ("processor_config.json", "tokenizer_config.json"):
        path = folder / file
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if "processor_class" in data:
                data["processor_class"] = name
                path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_merged(model: Any, folder: Path) -> None:
    from circot.config import CONFIG_NAME
    from circot.loading import _quiet_transformers

    hf = model.model.merge_and_unload() if model.is_lora else model.hf  # the model was loaded for this alone
    with _quiet_transformers():
        hf.save_pretrained(str(folder))
    _write_processor(model, folder)
    model.config.replace(lora=None).save(folder / CONFIG_NAME)


def _write_adapter(model: Any, folder: Path, final: Path) -> None:
    """In place (the model was loaded for this alone): the LoRA weights are taken, the token rows merged into
    the embeddings and the LM head, then the LoRA layers removed unmerged, leaving the base with the rows."""
    from peft import get_peft_model_state_dict
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from safetensors.torch import save_file

    from circot.loading import _quiet_transformers

    peft_model = model.model
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(peft_model).items()
        if "trainable_tokens" not in k  # the token rows go into base/
    }
    config = copy.deepcopy(peft_model.peft_config["default"])
    for module in peft_model.modules():
        if isinstance(module, TrainableTokensLayer):
            module.merge()
    base = peft_model.unload()
    (folder / "base").mkdir()
    with _quiet_transformers():
        base.save_pretrained(str(folder / "base"))
    _write_processor(model, folder / "base")

    adapter = folder / "adapter"
    adapter.mkdir()
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.trainable_token_indices = None
    config.base_model_name_or_path = str(final / "base")
    config.inference_mode = True
    config.save_pretrained(str(adapter))
    _write_processor(model, adapter)


__all__ = ["KINDS", "export_model"]

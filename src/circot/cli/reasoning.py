"""The options of full mode's reasoning and embedding that ``circot eval``, ``search`` and ``serve`` share (no
command here)."""

from __future__ import annotations

import typer

REASONER = typer.Option(
    "local",
    "--reasoner",
    help="Where the CoT comes from: local (the loaded model decodes) or openai (a served model).",
)
BASE_URL = typer.Option(
    None,
    "--base-url",
    help="--reasoner openai: the server's chat-completions base URL, e.g. http://host:8000/v1.",
)
REASONER_MODEL = typer.Option(
    None,
    "--reasoner-model",
    help="--reasoner openai: the served model's name (vLLM --served-model-name or LoRA name).",
)
REASONER_KEY_ENV = typer.Option(
    None,
    "--reasoner-api-key-env",
    help="Environment variable with the served reasoner's API key (default CIRCOT_REASONER_API_KEY, if set).",
)
FAST_WEIGHT = typer.Option(
    None,
    "--fast-weight",
    min=0.0,
    max=0.999,
    help="Full mode's query embedding: (1 - W) x the CoT's <emb> embedding + W x the fast one (default: the "
    "model's fast_weight; 0: the CoT's alone).",
)

COT_SAMPLES = typer.Option(
    None,
    "--cot-samples",
    min=0,
    help="Full mode also samples K CoTs per query and embeds the mean of theirs and the greedy one's (default: "
    "the model's cot_samples; 0: the greedy CoT alone). Costs K more decodes a query.",
)
COT_CHOICE = typer.Option(
    None,
    "--cot-choice",
    help="Which of full mode's CoTs is shown (with samples): greedy, or gallery: the one whose own embedding best "
    "matches a gallery image (default: the model's cot_choice). The ranking is the same either way.",
)


def build(kind: str, base_url: str | None, model: str | None, api_key_env: str | None, concurrency: int = 16):
    """The reasoner the options name (:func:`circot.reasoner.make_reasoner`)."""
    from circot.reasoner import make_reasoner

    return make_reasoner(kind, base_url, model, api_key_env, concurrency)

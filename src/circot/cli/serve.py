"""``circot serve``: the web service and its page."""

from __future__ import annotations

import typer

from circot.cli import reasoning


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_command(
        index: str = typer.Option(
            ...,
            "--store",
            "--index",
            help="Index from `circot index build`: a folder (faiss), a milvus-lite file.db or milvus://host/NAME.",
        ),
        model: str = typer.Option(
            None, "--model", help="Model folder or hub id; default: the shipped shapes model."
        ),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
        port: int = typer.Option(8000, "--port", help="Port to listen on."),
        device: str = typer.Option(
            "auto", "--device", help="Torch device: auto (a GPU if any), cpu, cuda:0..."
        ),
        max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", help="Largest uploaded image, in MB."),
        max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Largest uploaded image, in pixels."),
        max_text: int = typer.Option(500, "--max-text", help="Longest modification text, in characters."),
        max_k: int = typer.Option(100, "--max-k", help="Most results one search may ask for."),
        max_decoding: int = typer.Option(
            2, "--max-decoding", help="Uploads decoded at once (memory: about this × max pixels × 4 bytes)."
        ),
        allow_mismatch: bool = typer.Option(
            False, "--allow-mismatch", help="Serve an index built with another model (results will be poor)."
        ),
        api_key_env: str = typer.Option(
            None,
            "--api-key-env",
            help="Environment variable holding an API key that requests must send as 'Authorization: Bearer'.",
        ),
        reasoner_kind: str = reasoning.REASONER,
        base_url: str = reasoning.BASE_URL,
        reasoner_model: str = reasoning.REASONER_MODEL,
        reasoner_key_env: str = reasoning.REASONER_KEY_ENV,
        fast_weight: float = reasoning.FAST_WEIGHT,
        cot_samples: int = reasoning.COT_SAMPLES,
        cot_choice: str = reasoning.COT_CHOICE,
    ) -> None:
        """Serve a gallery index over HTTP: a JSON API and a page to search and steer the reasoning."""
        import os

        from circot.errors import CircotError
        from circot.serve import ServeLimits, serve

        api_key = None
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env, "").strip()
            if not api_key:
                raise CircotError(
                    f"--api-key-env: the environment variable {api_key_env!r} is not set or empty"
                )

        reasoner = reasoning.build(reasoner_kind, base_url, reasoner_model, reasoner_key_env)
        limits = ServeLimits(
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            max_pixels=max_pixels,
            max_text_chars=max_text,
            max_k=max_k,
            max_decoding=max_decoding,
        )
        try:
            serve(
                index,
                model=model,
                host=host,
                port=port,
                device=device,
                limits=limits,
                check_fingerprint=not allow_mismatch,
                api_key=api_key,
                reasoner=reasoner,
                fast_weight=fast_weight,
                cot_samples=cot_samples,
                cot_choice=cot_choice,
            )
        finally:
            reasoner.close()

"""Load an index and a model from disk and serve them with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from circot.errors import CircotError
from circot.serve.uploads import ServeLimits

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def use_whole_image_blocks(max_pixels: int) -> None:
    """Let PIL hold any allowed image in one memory block, so that freeing it returns it to the system.

    PIL stores a large image in 16 MB blocks; the C allocator keeps blocks of that size after they are freed
    (they fall under its mmap threshold once it has adapted), so a burst of large uploads left the server
    at its peak memory for good. One block per image is large enough to be mapped and unmapped as a whole.
    """
    core = getattr(Image, "core", None)
    if core is None or not hasattr(core, "set_block_size"):
        return
    wanted = max(max_pixels * 4, 16 * 1024 * 1024)  # 4 bytes a pixel (RGB is stored as RGBX)
    wanted = (wanted + 4095) // 4096 * 4096
    try:
        if core.get_block_size() < wanted:
            core.set_block_size(wanted)
    except (ValueError, TypeError, AttributeError) as exc:
        logger.debug("cannot set PIL's block size: %s", exc)


def serve(
    index_path: str | Path,
    model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    limits: ServeLimits | None = None,
    check_fingerprint: bool = True,
    log_level: str = "info",
    api_key: str | None = None,
    reasoner: Any = None,
    fast_weight: float | None = None,
    cot_samples: int | None = None,
    cot_choice: str | None = None,
) -> None:
    """Serve the gallery index at ``index_path`` (a store URI, see :mod:`circot.store`) with ``model``
    (default: the shipped shapes model).

    ``device``: a torch device, or ``auto`` (this process's GPU when there is one, else the CPU).
    ``api_key``: require it as a bearer token (see :func:`circot.serve.app.create_app`).
    ``reasoner``: where full mode's CoTs come from (:mod:`circot.reasoner`; default the model's own decode).
    ``fast_weight``, ``cot_samples``, ``cot_choice``: full mode's blend of the fast embedding and its sampled
    CoTs, and which CoT it shows, in place of the model's own (see :class:`circot.config.CIRCoTConfig`).

    Blocks until the server stops. Sets PIL's process-wide decompression-bomb limit to the pixel limit.

    Raises:
        CircotError: the index or the model cannot be loaded, or they do not belong together.
    """
    limits = limits or ServeLimits()
    if not 0 < port < 65536:
        raise CircotError(f"--port must be between 1 and 65535, not {port}")
    from circot.store import open_store, parse_store_uri

    spec = parse_store_uri(index_path)
    if spec.path is not None and not spec.path.exists():
        raise CircotError(f"index not found: {spec.path}")

    import uvicorn

    from circot.search import load_model
    from circot.serve.app import create_app

    # This process only serves: PIL's own guard now refuses anything over our pixel limit too.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    use_whole_image_blocks(limits.max_pixels)
    index = open_store(spec)
    loaded = load_model(model, device, fast_weight, cot_samples, cot_choice)
    app = create_app(
        index, loaded, limits=limits, check_fingerprint=check_fingerprint, api_key=api_key, reasoner=reasoner
    )
    if not _is_loopback(host):
        protection = "requests need the API key" if api_key else "without an API key (--api-key-env)"
        logger.warning("serving on %s: the service is reachable from other machines, %s", host, protection)
    logger.info("serving %d gallery images on http://%s:%d/", len(app.state.engine.gallery_ids), host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)

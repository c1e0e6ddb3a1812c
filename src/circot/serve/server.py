"""Load an index and a model from disk and serve them with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

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


def serve(
    index_path: Path,
    model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    limits: ServeLimits | None = None,
    check_fingerprint: bool = True,
    log_level: str = "info",
) -> None:
    """Serve the gallery index at ``index_path`` with ``model`` (default: the shipped shapes model).

    ``device``: a torch device, or ``auto`` (this process's GPU when there is one, else the CPU).

    Blocks until the server stops. Sets PIL's process-wide decompression-bomb limit to the pixel limit.

    Raises:
        CircotError: the index or the model cannot be loaded, or they do not belong together.
    """
    limits = limits or ServeLimits()
    if not 0 < port < 65536:
        raise CircotError(f"--port must be between 1 and 65535, not {port}")
    index_path = Path(index_path)
    if not index_path.exists():
        raise CircotError(f"index not found: {index_path}")

    import uvicorn

    from circot.index import GalleryIndex
    from circot.search import load_model
    from circot.serve.app import create_app

    # This process only serves: PIL's own guard now refuses anything over our pixel limit too.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    index = GalleryIndex.load(index_path)
    loaded = load_model(model, device)
    app = create_app(index, loaded, limits=limits, check_fingerprint=check_fingerprint)
    if not _is_loopback(host):
        logger.warning("serving on %s: the service is reachable from other machines", host)
    logger.info("serving %d gallery images on http://%s:%d/", len(app.state.engine.gallery_ids), host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)

"""The circot web service: a JSON API and a single page to search a gallery and steer the reasoning.

:func:`create_app` builds the FastAPI application from a loaded index and model; :func:`serve` loads them
from disk and runs it with uvicorn (``circot serve``).
"""

from __future__ import annotations

from circot.serve.app import create_app
from circot.serve.server import serve
from circot.serve.uploads import ServeLimits, UploadRejected, decode_image

__all__ = ["ServeLimits", "UploadRejected", "create_app", "decode_image", "serve"]

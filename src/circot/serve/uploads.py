"""Limits on what a client may send, and safe decoding of uploaded images.

Every rejection is a :class:`UploadRejected` (a :class:`circot.errors.CircotError`) carrying the HTTP status
the server answers with and a one-line message that says what was wrong and what the limit is.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from circot.errors import CircotError, ConfigError

# Formats a client may upload. Anything else (TIFF, PSD, EPS, ...) is refused before decoding.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for.

    Attributes:
        max_upload_bytes: largest uploaded image file.
        max_pixels: largest decoded image (width × height); guards against decompression bombs.
        max_text_chars: longest modification text.
        max_cot_chars: longest edited caption / reasoning / conclusion.
        max_k: most results one request may ask for.
        max_pending: requests allowed to wait for the model at once; more get 503.
        max_decoding: uploads decoded at the same time (the others wait for a slot); with ``max_pixels``
            this bounds the memory that decoding takes: about ``max_decoding × max_pixels × 4`` bytes.
    """

    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_text_chars: int = 500
    max_cot_chars: int = 2000
    max_k: int = 100
    max_pending: int = 32
    max_decoding: int = 2

    def __post_init__(self) -> None:
        for name in (
            "max_upload_bytes",
            "max_pixels",
            "max_text_chars",
            "max_cot_chars",
            "max_k",
            "max_pending",
            "max_decoding",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve limit {name} must be a positive integer, not {value!r}")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the image plus the text fields and multipart overhead."""
        return self.max_upload_bytes + 3 * self.max_cot_chars * 4 + self.max_text_chars * 4 + 64 * 1024


class UploadRejected(CircotError):
    """A request's input was refused; ``status_code`` is the HTTP status to answer with."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def check_upload_size(size: int, limits: ServeLimits) -> None:
    """Refuse an upload of ``size`` bytes when it is empty or over the limit."""
    if size == 0:
        raise UploadRejected("the uploaded image is empty (0 bytes)", 400)
    if size > limits.max_upload_bytes:
        raise UploadRejected(
            f"the uploaded image is larger than the limit of {_mb(limits.max_upload_bytes)}", 413
        )


def decode_image(data: bytes, limits: ServeLimits, target_pixels: int | None = None) -> Image.Image:
    """Decode an uploaded image into an RGB :class:`PIL.Image.Image`, or raise :class:`UploadRejected`.

    See :func:`decode_upload`, which also returns the size of the image as uploaded.
    """
    return decode_upload(data, limits, target_pixels)[0]


# Modes that ``Image.reduce`` handles; others are converted to RGB first.
_REDUCIBLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "I", "F", "CMYK", "RGBX", "La", "RGBa"})


def decode_upload(
    data: bytes, limits: ServeLimits, target_pixels: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an uploaded image: ``(RGB image, (width, height) as uploaded)``, or raise :class:`UploadRejected`.

    The pixel count is checked from the header, before any pixel is decoded; PIL's own decompression-bomb
    warning is turned into an error for this call, and its error is caught.

    ``target_pixels`` (the model's largest input, e.g. its processor's ``max_pixels``): a larger image is
    downscaled as it is decoded (JPEG: by the decoder itself, ``draft``), then by an integer box filter
    (``reduce``) to no fewer than ``target_pixels`` pixels, so that at most one full-size copy of an upload
    is ever in memory and what is kept is small. The model's processor does the final resize as before.
    """
    check_upload_size(len(data), limits)
    allowed = ", ".join(ALLOWED_FORMATS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            width, height = image.size
            if width < 1 or height < 1:
                raise UploadRejected(f"the uploaded image has no pixels ({width}×{height})", 400)
            if width * height > limits.max_pixels:
                raise UploadRejected(
                    f"the uploaded image is {width}×{height} = {width * height:,} pixels, over the limit of "
                    f"{limits.max_pixels:,} pixels",
                    413,
                )
            factor = _reduce_factor(width * height, target_pixels)
            if factor > 1 and image.format == "JPEG":
                image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
            image.load()
            orientation = _orientation(image)
            factor = _reduce_factor(image.width * image.height, target_pixels)
            if factor > 1:  # reduce first: the rotation below then copies the small image only
                if image.mode not in _REDUCIBLE_MODES:
                    image = image.convert("RGB")
                image = image.reduce(factor)
            if orientation in _ORIENTATION_OPS:
                image = image.transpose(_ORIENTATION_OPS[orientation])
            rgb = image if image.mode == "RGB" else image.convert("RGB")
        except UploadRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UploadRejected(
                f"the uploaded image is a decompression bomb (too many pixels for its size): {exc}", 413
            ) from exc
        except UnidentifiedImageError as exc:
            raise UploadRejected(
                f"the upload is not an image in a supported format ({allowed})", 415
            ) from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
            raise UploadRejected(f"the uploaded image is corrupt or truncated: {exc}", 400) from exc
        except Exception as exc:  # a decoder plugin failing in an unexpected way is still bad input
            raise UploadRejected(f"the uploaded image could not be decoded: {exc}", 400) from exc
    return rgb, (width, height)


def _reduce_factor(pixels: int, target_pixels: int | None) -> int:
    """The largest integer factor that keeps at least ``target_pixels`` pixels (1: no reduction)."""
    if not target_pixels or pixels <= target_pixels:
        return 1
    return max(1, math.isqrt(pixels // target_pixels))


# EXIF orientation -> the transposition that shows the image upright (as ``ImageOps.exif_transpose``).
_ORIENTATION_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # unreadable EXIF: keep the image as decoded
        return 1

"""Opening image files whose damage must read as one line naming the file.

PIL reports a damaged file with several exception types: OSError (truncated data, unknown
format), SyntaxError (a broken PNG chunk), ValueError, EOFError, ``struct.error``, and
``Image.DecompressionBombError`` (an ``Exception`` of its own, raised when the header claims more
than twice ``Image.MAX_IMAGE_PIXELS`` pixels). :data:`IMAGE_ERRORS` holds them all, so callers
catch them in one place and name the file.
"""
from __future__ import annotations

import struct
from pathlib import Path

from PIL import Image

IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def describe(err: BaseException) -> str:
    """Why an image could not be decoded, on one line (``Type: first line of message``)."""
    if isinstance(err, Image.DecompressionBombError):
        return (f"its header claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, "
                "PIL's decompression-bomb limit")
    text = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_image(path: str | Path) -> Image.Image:
    """The image at ``path``, fully decoded (a truncated file fails here, not later)."""
    image = Image.open(path)
    image.load()
    return image

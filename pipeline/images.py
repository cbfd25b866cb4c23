"""Image cells to RGB PIL images, with a clear one-line reason when that is impossible.

A cell may hold raw bytes, a `datasets` Image struct ({"bytes", "path"}), a path (relative
to the dataset, absolute, or a URI such as s3://), or an http(s) URL, fetched by
`pipeline.urls` (the job's CPU stage fetches a batch's URLs concurrently before this). Images
are size-checked from their header before any pixel is decoded, so a decompression bomb
costs nothing.
"""
from __future__ import annotations

import io
import posixpath
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .common import filesystem, first_line
from .urls import fetch, is_url

DEFAULT_MAX_PIXELS = 40_000_000


class BadImage(ValueError):
    """A row's image cannot be used; the message goes to the row's `error` column."""


def image_bytes(cell: Any, base_dir: str | None = None) -> bytes:
    """The encoded bytes behind an image cell."""
    if isinstance(cell, dict):
        if cell.get("bytes") is None:
            if cell.get("path"):
                return _read_path(cell["path"], base_dir)
            raise BadImage("missing image: the image struct has neither bytes nor a path")
        cell = cell["bytes"]
    if isinstance(cell, (bytes, bytearray, memoryview)):
        if len(cell) == 0:
            raise BadImage("empty image bytes")
        return bytes(cell)
    if isinstance(cell, str) and cell:
        return _read_path(cell, base_dir)
    if cell is None:
        raise BadImage("missing image (null)")
    raise BadImage(f"unsupported image cell of type {type(cell).__name__}")


def _read_path(path: str, base_dir: str | None) -> bytes:
    if is_url(path):
        return fetch(path).data  # raises urls.FetchError, a ValueError, with the status or reason
    if "://" not in path and not posixpath.isabs(path) and base_dir:
        path = posixpath.join(base_dir, path)
    try:
        fs, inner = filesystem(path)
        with fs.open_input_stream(inner) as f:
            data = f.read()
    except (FileNotFoundError, OSError) as e:
        raise BadImage(f"cannot read image file {path}: {first_line(e)}") from None
    if not data:
        raise BadImage(f"image file {path} is empty")
    return data


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to RGB. Alpha is composited on white; 16-bit and float images are rescaled."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image: unrecognised or corrupt header") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadImage(f"image exceeds the pixel limit of {max_pixels:,} (--max-image-pixels)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated image: {first_line(e)}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage(f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
                       f"{max_pixels:,} (--max-image-pixels)")
    if width * height == 0:
        raise BadImage("image has no pixels")
    try:
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad data
        raise BadImage(f"corrupt or truncated image: {first_line(e)}") from None
    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")

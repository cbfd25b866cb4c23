"""Image cells to RGB: every kind of bad input is one clear reason; odd modes convert."""
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import BadImage, decode, image_bytes


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


GOOD = png(Image.new("RGB", (40, 30), (10, 200, 30)))


@pytest.mark.parametrize("cell, message", [
    (None, "missing image (null)"),
    (b"", "empty image bytes"),
    ({"bytes": None, "path": None}, "neither bytes nor a path"),
    ("does/not/exist.png", "cannot read image file"),
    (12, "unsupported image cell of type int"),
])
def test_cells_without_bytes(cell, message, tmp_path):
    with pytest.raises(BadImage) as err:
        image_bytes(cell, str(tmp_path))
    assert message in str(err.value)


def test_paths_resolve_relative_to_the_dataset(tmp_path):
    (tmp_path / "a.png").write_bytes(GOOD)
    assert image_bytes("a.png", str(tmp_path)) == GOOD
    assert image_bytes({"bytes": None, "path": str(tmp_path / "a.png")}) == GOOD
    assert image_bytes({"bytes": GOOD, "path": "elsewhere.png"}) == GOOD


@pytest.mark.parametrize("data, message", [
    (b"hello, I am a text file", "not an image"),
    (GOOD[:60], "corrupt or truncated image"),
    (GOOD[:8] + b"\x00" * 200, "not an image"),
])
def test_undecodable_bytes(data, message):
    with pytest.raises(BadImage) as err:
        decode(data)
    assert message in str(err.value)


def test_pixel_limit_is_checked_before_decoding():
    big = png(Image.new("L", (3000, 2000)))  # compresses to a few KB
    with pytest.raises(BadImage) as err:
        decode(big, max_pixels=1_000_000)
    assert "3000x2000 = 6,000,000 pixels, above the limit of 1,000,000" in str(err.value)
    assert decode(big, max_pixels=6_000_000).size == (3000, 2000)


def test_modes_are_converted_not_rejected():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white after compositing
    assert decode(png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert decode(png(la)).getpixel((0, 0)) == (0, 0, 0)
    p = Image.new("P", (4, 4), 3)
    p.putpalette([0, 0, 0] * 3 + [0, 0, 255] + [0, 0, 0] * 252)
    assert decode(png(p)).getpixel((1, 1)) == (0, 0, 255)
    assert decode(png(Image.new("L", (4, 4), 77))).getpixel((0, 0)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert decode(png(cmyk, "JPEG")).mode == "RGB"
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert decode(png(sixteen)).getpixel((0, 0)) == (255, 255, 255)

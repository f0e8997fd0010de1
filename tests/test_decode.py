import io

import numpy as np
import pytest
from PIL import Image

from service.core.decode import InputSpec, decode, preprocess
from service.errors import RequestError
from tests.helpers import png_header_only

GREY = InputSpec(32, grey=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
RGB = InputSpec(32, grey=False, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(mode: str = "L", size: tuple[int, int] = (28, 28)) -> Image.Image:
    x = np.linspace(0, 255, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint8)
    return Image.fromarray(x if mode == "L" else np.stack([x, 255 - x, x // 2], -1))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_formats_and_modes_decode_to_the_encoder_input(fmt: str, mode: str) -> None:
    for spec in (GREY, RGB):
        x = decode(encode(gradient(mode), fmt), spec, max_pixels=10**6)
        assert x.shape == (3, 32, 32) and x.dtype == np.float32
        assert np.isfinite(x).all()
        if spec.grey:  # one grey channel, repeated
            assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])


def test_normalisation_matches_the_spec() -> None:
    white = encode(Image.new("L", (32, 32), 255), "PNG")
    black = encode(Image.new("L", (32, 32), 0), "PNG")
    assert np.allclose(decode(white, GREY, 10**6), 1.0) and np.allclose(decode(black, GREY, 10**6), -1.0)
    x = decode(encode(Image.new("RGB", (32, 32), (255, 0, 0)), "PNG"), RGB, 10**6)
    assert np.allclose(x[:, 0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], atol=1e-5)


def test_png_bytes_and_the_array_they_hold_preprocess_identically() -> None:
    """The memory is embedded from arrays, queries arrive as PNG: the two paths must agree exactly."""
    image = gradient("L")
    assert np.array_equal(decode(encode(image, "PNG"), GREY, 10**6), preprocess(image, GREY))


def test_non_square_images_are_centre_cropped() -> None:
    wide = Image.new("L", (96, 32), 0)
    wide.paste(255, (32, 0, 64, 32))  # a white centre square between black sides
    assert np.allclose(decode(encode(wide, "PNG"), GREY, 10**6), 1.0)


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"", 400, "empty"),
        (b"hello, this is text", 415, "not an image"),
        (encode(gradient(), "GIF"), 415, "not an image"),  # a real image, but not a format we take
        (encode(gradient(), "PNG")[:60], 400, "truncated"),
        (encode(gradient("RGB", (64, 64)), "JPEG")[:300], 400, "truncated"),
    ],
)
def test_bad_input_raises_with_a_status_and_message(data: bytes, status: int, words: str) -> None:
    with pytest.raises(RequestError) as e:
        decode(data, GREY, 10**6)
    assert e.value.status == status and words in e.value.message


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(RequestError) as e:
        decode(png_header_only(50_000, 50_000), GREY, max_pixels=40_000_000)
    assert e.value.status == 413 and "pixels" in e.value.message
    with pytest.raises(RequestError) as e:  # under PIL's own bomb limit, over ours
        decode(png_header_only(5_000, 5_000), GREY, max_pixels=1_000_000)
    assert e.value.status == 413 and "limit is 1000000" in e.value.message


def test_spec_round_trips_through_the_manifest_form() -> None:
    assert InputSpec.from_dict(RGB.to_dict()) == RGB

"""Image bytes -> encoder input: the one preprocessing that both the service and the memory builder use."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.errors import RequestError

# A truncated upload is an error to report, never an image to guess the rest of.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The pixel limit is the service's own (RAC_MAX_PIXELS), checked on every header before a pixel is decoded
# (open_image): Pillow's process-wide one (about 89 million) would otherwise answer first, quoting itself.
Image.MAX_IMAGE_PIXELS = None

FORMATS = ("PNG", "JPEG", "WEBP")
MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"RIFF": "WebP"}


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the encoder's (3, size, size) float32 input; stored in the manifest."""

    size: int  # square side in pixels
    grey: bool  # True: convert to one grey channel, then repeat it (the memory was grey)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "grey": self.grey, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(int(d["size"]), bool(d["grey"]), tuple(d["mean"]), tuple(d["std"]))


def open_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Parse and fully decode `data`, checking format and pixel count before any pixels are decoded.

    draft_size: let libjpeg decode large photos at a reduced scale (at least this many pixels a side):
    far cheaper, and the same result after the resize to the encoder's input.
    """
    if not data:
        raise RequestError(400, "empty file: the image field holds no bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        fmt = next((name for magic, name in MAGIC.items() if data.startswith(magic)), None)
        if fmt is not None:  # the right signature, then nothing readable: a broken upload, not a wrong type
            raise RequestError(400, f"corrupt or truncated {fmt} image: its header cannot be read") from None
        raise RequestError(415, "not an image this service reads: send PNG, JPEG or WebP") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(400, f"corrupt or truncated image header: {e}") from None
    width, height = image.size
    if width * height > max_pixels:  # checked on the header, before decoding (decompression bombs)
        raise RequestError(413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width == 0 or height == 0:
        raise RequestError(400, f"image has no pixels ({width}x{height})")
    if draft_size is not None and image.format == "JPEG":
        image.draft(image.mode, (draft_size, draft_size))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(400, f"corrupt or truncated {image.format} image: {e}") from None
    return image


@functools.lru_cache(maxsize=8)
def _affine(spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """(v / 255 - mean) / std as v * scale + offset, per channel: two (3, 1, 1) float32 arrays."""
    std, mean = np.asarray(spec.std, np.float64), np.asarray(spec.mean, np.float64)
    scale, offset = 1.0 / (255.0 * std), -mean / std
    return scale.astype(np.float32)[:, None, None], offset.astype(np.float32)[:, None, None]


def preprocess(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """PIL image -> (3, size, size) float32: upright, grey or RGB, centre-cropped square, normalised."""
    image = ImageOps.exif_transpose(image) if image.format == "JPEG" else image
    image = image.convert("L" if spec.grey else "RGB")
    if image.size != (spec.size, spec.size):
        # Centre crop to square, then resize: a no-op crop for square images such as Fashion-MNIST.
        image = ImageOps.fit(image, (spec.size, spec.size), Image.Resampling.BILINEAR)
    levels = np.asarray(image)  # (S, S) or (S, S, 3) uint8
    pixels = (levels[None] if spec.grey else levels.transpose(2, 0, 1)).astype(np.float32)  # (1 or 3, S, S)
    scale, offset = _affine(spec)
    return pixels * scale + offset  # (3, S, S) float32: broadcasting repeats a grey channel three times


def decode(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> encoder input (3, S, S) float32; raises RequestError with an HTTP status."""
    return preprocess(open_image(data, max_pixels, draft_size=2 * spec.size), spec)

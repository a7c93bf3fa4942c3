"""Images on the wire (`Image` in common.proto, JPEG/PNG bytes in requests), one validator for every side.

    image = decode_image(request.image, "image")           # bytes -> uint8 RGB (H, W, 3), or ValidationError
    message = encode_image(rgb, pb.JPEG)                     # uint8 RGB -> Image within the limits
    frame = decode_frame_image(message, width, height)       # a server's Image -> uint8 RGB, or ProtocolError

`decode_image` checks the byte count and the sides declared in the PNG / JPEG header before it
decodes anything (a small file may declare a huge image: a decompression bomb), then decodes
with OpenCV and checks the sides again. Every failure names the field, the value and what was
expected.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import cv2
import numpy as np

from services.wire.errors import ProtocolError, ValidationError
from services.wire.protos import Limit, pb

__all__ = [
    "DEFAULT_JPEG_QUALITY",
    "check_rgb",
    "check_side",
    "decode_frame_image",
    "decode_image",
    "encode_image",
    "encoded_image",
    "fit_crop",
    "image_header",
    "portrait_bytes",
]

DEFAULT_JPEG_QUALITY = 90
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_JPEG_MAGIC = b"\xff\xd8\xff"  # SOI and the first marker: what a JPEG file starts with
# JPEG start-of-frame markers (baseline, progressive, lossless, ...): not DHT (C4), JPG (C8), DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # markers without a length field
_JPEG_SOS = 0xDA
# A portrait up to this many pixels is sent as PNG (lossless) when that fits MAX_IMAGE_BYTES.
_PNG_PORTRAIT_MAX_PIXELS = 512 * 512


# -- reading headers and checking sizes -------------------------------------------------------------


def image_header(data: bytes) -> tuple[str, int, int] | None:
    """("PNG" or "JPEG", width, height) read from the file header without decoding; None otherwise."""
    if data[:8] == _PNG_SIGNATURE:
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return "PNG", width, height
    if data[:2] != _JPEG_SOI:
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return "JPEG", width, height
        if marker == _JPEG_SOS or length < 2:  # image data before any frame header
            return None
        i += 2 + length
    return None


def check_side(field: str, width: int, height: int) -> None:
    """Both sides within [MIN_IMAGE_SIDE, MAX_IMAGE_SIDE]."""
    low, high = Limit.MIN_IMAGE_SIDE, Limit.MAX_IMAGE_SIDE
    if not (low <= width <= high and low <= height <= high):
        raise ValidationError(field, f"image is {width}x{height}; expected width and height in [{low}, {high}]")


def check_rgb(field: str, image: Any) -> np.ndarray:
    """`image` as a uint8 RGB array (H, W, 3) with sides within the limits."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValidationError(field, f"expected a uint8 RGB array (H, W, 3), got {dtype} of shape {shape}")
    check_side(field, image.shape[1], image.shape[0])
    return image


# -- decoding what a client sent ------------------------------------------------------------------


def decode_image(data: bytes, field: str) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 RGB (H, W, 3); size, format and sides are checked before decoding."""
    if not data:
        raise ValidationError(field, "empty; expected JPEG or PNG bytes")
    if len(data) > Limit.MAX_IMAGE_BYTES:
        raise ValidationError(field, f"{len(data)} bytes exceeds MAX_IMAGE_BYTES = {Limit.MAX_IMAGE_BYTES}")
    header = image_header(data)
    if header is None:
        raise ValidationError(
            field, f"not a JPEG or PNG image (unrecognised header {bytes(data[:8])!r}); expected JPEG or PNG bytes"
        )
    kind, width, height = header
    check_side(field, width, height)  # before decoding: no decompression bombs
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValidationError(field, f"{kind} image ({width}x{height}) could not be decoded; expected a valid file")
    check_side(field, image.shape[1], image.shape[0])  # EXIF orientation may swap the sides
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def fit_crop(crop: np.ndarray, size: int) -> np.ndarray:
    """A face crop (H, W, 3) resized to (size, size, 3) when it is not that size already."""
    if crop.shape[0] == size and crop.shape[1] == size:
        return crop
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


# -- encoding what a client sends -----------------------------------------------------------------


def encode_image(image: np.ndarray, image_format: int = pb.JPEG, quality: int = DEFAULT_JPEG_QUALITY) -> pb.Image:
    """uint8 RGB (H, W, 3) -> an `Image` message (RAW_RGB, JPEG or PNG) within the contract's limits."""
    image = check_rgb("image", image)
    height, width = image.shape[:2]
    if image_format == pb.RAW_RGB:
        return pb.Image(format=pb.RAW_RGB, width=width, height=height, data=np.ascontiguousarray(image).tobytes())
    if image_format not in (pb.JPEG, pb.PNG):
        raise ValidationError("format", f"got {image_format!r}; expected JPEG, PNG or RAW_RGB")
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if image_format == pb.JPEG else []
    ok, encoded = cv2.imencode(".jpg" if image_format == pb.JPEG else ".png", bgr, params)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
        raise ValidationError("image", "OpenCV could not encode the image")
    data = encoded.tobytes()
    if len(data) > Limit.MAX_IMAGE_BYTES:
        raise ValidationError(
            "image",
            f"encoded to {len(data)} bytes; expected at most {Limit.MAX_IMAGE_BYTES} (use JPEG or a lower quality)",
        )
    return pb.Image(format=image_format, width=width, height=height, data=data)


def encoded_image(data: bytes, field: str = "image") -> pb.Image:
    """JPEG or PNG file bytes -> an `Image` message. Only the signature and the size are checked:
    the sides and the body are the server's to check (`decode_image`)."""
    data = bytes(data)
    if data.startswith(_JPEG_MAGIC):
        image_format = pb.JPEG
    elif data.startswith(_PNG_SIGNATURE):
        image_format = pb.PNG
    else:
        raise ValidationError(field, f"expected JPEG or PNG bytes, got {len(data)} bytes of something else")
    if len(data) > Limit.MAX_IMAGE_BYTES:
        raise ValidationError(field, f"got {len(data)} bytes; expected at most {Limit.MAX_IMAGE_BYTES}")
    return pb.Image(format=image_format, data=data)


def portrait_bytes(portrait: bytes | np.ndarray | str | os.PathLike[str]) -> bytes:
    """A portrait as JPEG/PNG bytes: bytes as they are, an image file as it is when it is JPEG/PNG
    within MAX_IMAGE_BYTES, else (any file OpenCV reads, a uint8 RGB array) encoded: PNG when it is
    small enough, JPEG otherwise."""
    if isinstance(portrait, bytes | bytearray | memoryview):
        return encoded_image(bytes(portrait), "portrait").data
    if isinstance(portrait, str | os.PathLike):
        with open(portrait, "rb") as file:
            data = file.read()
        if data.startswith((_JPEG_MAGIC, _PNG_SIGNATURE)) and len(data) <= Limit.MAX_IMAGE_BYTES:
            return data
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ValidationError("portrait", f"{os.fspath(portrait)}: not an image OpenCV can decode")
        portrait = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    image = check_rgb("portrait", portrait)
    small = image.shape[0] * image.shape[1] <= _PNG_PORTRAIT_MAX_PIXELS
    encoded = encode_image(image, pb.PNG) if small else None
    if encoded is None or len(encoded.data) > Limit.MAX_IMAGE_BYTES:
        encoded = encode_image(image, pb.JPEG, quality=95)
    return encoded.data


# -- decoding what a server sent ------------------------------------------------------------------


def decode_frame_image(image: pb.Image, width: int, height: int) -> np.ndarray:
    """An avatar frame's `Image` -> uint8 RGB (H, W, 3). `width` / `height` (Started's) stand in for
    a RAW_RGB image that leaves its own at 0. A broken frame is the server's fault: ProtocolError."""
    if image.format == pb.RAW_RGB:
        height, width = image.height or height, image.width or width
        if len(image.data) != height * width * 3:
            raise ProtocolError(f"frame.image.data: got {len(image.data)} bytes; expected {width}x{height}x3")
        return np.frombuffer(image.data, np.uint8).reshape(height, width, 3).copy()
    if image.format in (pb.JPEG, pb.PNG):
        decoded = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ProtocolError(
                f"frame.image: {len(image.data)} bytes that do not decode as {pb.ImageFormat.Name(image.format)}"
            )
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    raise ProtocolError(f"frame.image.format: got {image.format}; expected RAW_RGB, JPEG or PNG")

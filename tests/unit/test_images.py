"""The one image validator (`services.wire.images`): headers read without decoding, sizes checked
before decoding (decompression bombs), formats, corrupt data, RGB channel order, and the client's
encoders and the decoder of server frames."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from services.wire import images
from services.wire.errors import ProtocolError, ValidationError
from services.wire.images import (
    check_rgb,
    check_side,
    decode_frame_image,
    decode_image,
    encode_image,
    encoded_image,
    fit_crop,
    image_header,
    portrait_bytes,
)
from services.wire.limits import check_message_size
from services.wire.protos import Limit, pb

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring width x height (no image data after it)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def jpeg_header(width: int, height: int) -> bytes:
    """A JPEG start: SOI, an APP0 segment, then an SOF0 frame header of the given size."""
    sof = b"\xff\xc0\x00\x11\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03" + b"\x00" * 9
    return b"\xff\xd8" + b"\xff\xe0\x00\x04\x00\x00" + sof


def rgb_image(height: int = 40, width: int = 70) -> np.ndarray:
    """An image whose three channels differ, so that a swapped channel order shows."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 200, 100, 30
    return image


def png_of(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.fixture()
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything is decoded."""

    def imdecode(*args: object) -> None:
        raise AssertionError("decoded an image that the header or size check should have rejected")

    monkeypatch.setattr(images.cv2, "imdecode", imdecode)


def rejected(data: bytes, field: str = "image") -> str:
    with pytest.raises(ValidationError) as info:
        decode_image(data, field)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    return str(info.value)


# -- headers -------------------------------------------------------------------------------------


def test_image_header_reads_png_and_jpeg() -> None:
    assert image_header((SAMPLES / "portrait.png").read_bytes()) == ("PNG", 256, 256)
    _, jpeg = cv2.imencode(".jpg", np.zeros((40, 70, 3), np.uint8))
    assert image_header(jpeg.tobytes()) == ("JPEG", 70, 40)
    assert image_header(jpeg_header(2000, 30)) == ("JPEG", 2000, 30)
    assert image_header(png_header(123, 45)) == ("PNG", 123, 45)
    assert image_header(b"GIF89a....") is None
    assert image_header(b"\x89PNG\r\n\x1a\n" + b"\x00" * 4) is None  # truncated before IHDR
    assert image_header(b"\xff\xd8\xff\xda\x00\x02") is None  # scan data before any frame header


# -- decode_image: rejected before decoding ------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "declared"),
    [
        (png_header(100_000, 100_000), "100000x100000"),
        (png_header(64, Limit.MAX_IMAGE_SIDE + 1), f"64x{Limit.MAX_IMAGE_SIDE + 1}"),
        (jpeg_header(2000, 30), "2000x30"),
        (jpeg_header(Limit.MIN_IMAGE_SIDE - 1, 64), f"{Limit.MIN_IMAGE_SIDE - 1}x64"),
    ],
)
def test_a_side_declared_out_of_range_is_rejected_without_decoding(no_decoding, data: bytes, declared: str) -> None:
    message = rejected(data, "portrait")
    expected = f"expected width and height in [{Limit.MIN_IMAGE_SIDE}, {Limit.MAX_IMAGE_SIDE}]"
    assert f"image is {declared}; {expected}" in message


def test_too_many_bytes_are_rejected_without_decoding(no_decoding) -> None:
    data = png_header(64, 64) + bytes(Limit.MAX_IMAGE_BYTES)
    message = rejected(data, "images.images[0]")
    assert f"{len(data)} bytes exceeds MAX_IMAGE_BYTES = {Limit.MAX_IMAGE_BYTES}" in message


def test_empty_and_unknown_formats_are_rejected_without_decoding(no_decoding) -> None:
    assert "empty; expected JPEG or PNG bytes" in rejected(b"")
    gif = b"GIF89a" + bytes(100)
    assert "not a JPEG or PNG image" in rejected(gif) and "GIF89a" in rejected(gif)
    _, bmp = cv2.imencode(".bmp", np.zeros((32, 32, 3), np.uint8))
    assert "expected JPEG or PNG bytes" in rejected(bmp.tobytes())


# -- decode_image: decoded -----------------------------------------------------------------------


def test_corrupt_data_with_a_valid_header_is_rejected() -> None:
    assert "JPEG image (64x64) could not be decoded; expected a valid file" in rejected(jpeg_header(64, 64))
    png = png_of(rgb_image())
    assert "PNG image (70x40) could not be decoded" in rejected(png[:40] + b"\x00" * (len(png) - 40))


def test_a_valid_image_decodes_to_rgb() -> None:
    rgb = rgb_image()
    decoded = decode_image(png_of(rgb), "image")
    assert decoded.dtype == np.uint8 and decoded.shape == (40, 70, 3)
    np.testing.assert_array_equal(decoded, rgb)  # RGB, not OpenCV's BGR
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    assert np.abs(decode_image(jpeg.tobytes(), "image").astype(int) - rgb).max() <= 3


def test_validation_error_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"^user_frame\.data: "):
        decode_image(b"nope", "user_frame.data")


# -- checks and crops ----------------------------------------------------------------------------


def test_check_side_and_check_rgb() -> None:
    check_side("x", Limit.MIN_IMAGE_SIDE, Limit.MAX_IMAGE_SIDE)
    with pytest.raises(ValidationError, match=r"^crops\.shape: image is 32x8; expected"):
        check_side("crops.shape", 32, 8)
    assert check_rgb("image", rgb_image()) is not None
    for bad in (np.zeros((32, 32), np.uint8), np.zeros((32, 32, 3), np.float32), [[1, 2, 3]]):
        with pytest.raises(ValidationError, match=r"^image: expected a uint8 RGB array"):
            check_rgb("image", bad)


def test_fit_crop_resizes_only_other_sizes() -> None:
    crop = rgb_image(64, 64)
    assert fit_crop(crop, 64) is crop
    assert fit_crop(rgb_image(80, 96), 64).shape == (64, 64, 3)


def test_check_message_size() -> None:
    check_message_size(pb.EncodePortraitRequest(image=b"x" * 100))
    big = pb.EncodedImages(images=[b"x" * Limit.MAX_IMAGE_BYTES] * (Limit.MAX_MESSAGE_BYTES // Limit.MAX_IMAGE_BYTES))
    with pytest.raises(ValidationError, match="exceeds MAX_MESSAGE_BYTES") as info:
        check_message_size(pb.EncodeUserMotionRequest(images=big))
    assert info.value.field == "request"


# -- the client's encoders and the decoder of server frames --------------------------------------


@pytest.mark.parametrize("image_format", [pb.RAW_RGB, pb.PNG, pb.JPEG])
def test_encode_image_round_trips_through_decode_frame_image(image_format: int) -> None:
    rgb = rgb_image()
    message = encode_image(rgb, image_format)
    assert (message.format, message.width, message.height) == (image_format, 70, 40)
    back = decode_frame_image(message, 0, 0)
    assert back.shape == rgb.shape and np.abs(back.astype(int) - rgb).max() <= (3 if image_format == pb.JPEG else 0)
    if image_format != pb.RAW_RGB:
        np.testing.assert_array_equal(decode_image(message.data, "image"), back)


def test_encode_image_rejects_bad_input() -> None:
    with pytest.raises(ValidationError, match=r"^format: "):
        encode_image(rgb_image(), 99)
    with pytest.raises(ValidationError, match=r"^image: image is 8x8"):
        encode_image(np.zeros((8, 8, 3), np.uint8))


def test_encoded_image_and_portrait_bytes(tmp_path: Path) -> None:
    png = png_of(rgb_image())
    assert encoded_image(png).format == pb.PNG and encoded_image(png).data == png
    with pytest.raises(ValidationError, match=r"^user_frame: expected JPEG or PNG bytes"):
        encoded_image(b"GIF89a", "user_frame")
    with pytest.raises(ValidationError, match=f"expected at most {Limit.MAX_IMAGE_BYTES}"):
        encoded_image(png + bytes(Limit.MAX_IMAGE_BYTES), "portrait")
    assert portrait_bytes(png) == png
    path = tmp_path / "p.png"
    path.write_bytes(png)
    assert portrait_bytes(path) == png
    np.testing.assert_array_equal(decode_image(portrait_bytes(rgb_image()), "portrait"), rgb_image())
    bmp = tmp_path / "p.bmp"
    cv2.imwrite(str(bmp), cv2.cvtColor(rgb_image(), cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(decode_image(portrait_bytes(bmp), "portrait"), rgb_image())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValidationError, match="not an image OpenCV can decode"):
        portrait_bytes(tmp_path / "bad.png")


def test_decode_frame_image_raises_protocol_error() -> None:
    raw = pb.Image(format=pb.RAW_RGB, data=bytes(16 * 16 * 3))
    assert decode_frame_image(raw, 16, 16).shape == (16, 16, 3)  # Started's size stands in
    with pytest.raises(ProtocolError, match=r"frame\.image\.data: got 768 bytes; expected 16x17x3"):
        decode_frame_image(raw, 16, 17)
    with pytest.raises(ProtocolError, match="do not decode as JPEG"):
        decode_frame_image(pb.Image(format=pb.JPEG, data=b"junk"), 16, 16)
    with pytest.raises(ProtocolError, match=r"frame\.image\.format"):
        decode_frame_image(pb.Image(format=pb.IMAGE_FORMAT_UNSPECIFIED), 16, 16)

"""MotionEncoder: face images -> 512-d motion latents, and avatar portraits -> reference motion.

- EncodeUserMotion: the human's face crops (a UINT8 (N, H, W, 3) tensor, or JPEG/PNG images)
  -> user motion latents (N, 512), `avatar_forcing.frames.encode_user_motion`. Crops that are
  not the model's image size are resized (cv2.INTER_AREA) first.
- EncodePortrait: a portrait photo -> the avatar's reference motion r_s (512,). The face is
  found and cropped (`FaceCropper.crop_portrait`), encoded (`encode_portrait`), and the photo
  is stored in Redis under (tenant, avatar_id) so that decoders and generators can rebuild the
  avatar's encoding from it (`portrait_encoding`, the one function both sides use).

Ray-free; `deployment.py` adapts it to Ray Serve.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np

from avatar_forcing.engine.portrait import PortraitEncoding, encode_portrait, encode_user_motion
from avatar_forcing.media.face_crop import FaceCropper, NoFaceError
from avatar_forcing.nn.model import AvatarForcing
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder
from services.common.config import Settings
from services.common.telemetry import rpc_span
from services.store import SessionStore
from services.wire.errors import ValidationError
from services.wire.ids import check_id
from services.wire.protos import Limit, pb
from services.wire.tensors import decode, encode

log = logging.getLogger(__name__)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, ...): not DHT (C4), JPG (C8), DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # markers without a length field


# -- images ------------------------------------------------------------------------------------


def image_header(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) read from a PNG or JPEG header without decoding; None otherwise."""
    if data[:8] == _PNG_SIGNATURE:
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return "PNG", width, height
    if data[:2] != b"\xff\xd8":
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
        if marker == 0xDA or length < 2:  # image data before any frame header
            return None
        i += 2 + length
    return None


def _check_side(field: str, width: int, height: int) -> None:
    low, high = Limit.MIN_IMAGE_SIDE, Limit.MAX_IMAGE_SIDE
    if not (low <= width <= high and low <= height <= high):
        raise ValidationError(field, f"image is {width}x{height}; expected width and height in [{low}, {high}]")


def decode_image(data: bytes, field: str) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 RGB (H, W, 3), with the contract's size limits checked first."""
    if not data:
        raise ValidationError(field, "empty; expected JPEG or PNG bytes")
    if len(data) > Limit.MAX_IMAGE_BYTES:
        raise ValidationError(field, f"{len(data)} bytes exceeds MAX_IMAGE_BYTES = {Limit.MAX_IMAGE_BYTES}")
    header = image_header(data)
    if header is None:
        raise ValidationError(field, "not a JPEG or PNG image (unrecognised header); expected JPEG or PNG bytes")
    kind, width, height = header
    _check_side(field, width, height)  # before decoding: no decompression bombs
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValidationError(field, f"{kind} image ({width}x{height}) could not be decoded; expected a valid file")
    _check_side(field, image.shape[1], image.shape[0])  # EXIF orientation may swap the sides
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_message_size(request: Any) -> None:
    """The whole request within MAX_MESSAGE_BYTES (Serve's gRPC proxy itself accepts up to 2 GiB)."""
    size = request.ByteSize()
    if size > Limit.MAX_MESSAGE_BYTES:
        raise ValidationError("request", f"{size} bytes exceeds MAX_MESSAGE_BYTES = {Limit.MAX_MESSAGE_BYTES}")


def fit_crop(crop: np.ndarray, size: int) -> np.ndarray:
    """A face crop (H, W, 3) resized to (size, size, 3) when it is not that size already."""
    if crop.shape[0] == size and crop.shape[1] == size:
        return crop
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def derive_avatar_id(portrait: bytes) -> str:
    """The avatar id of a portrait given without one: a digest of its bytes (stable per image)."""
    return "av_" + hashlib.sha256(portrait).hexdigest()[:32]


def portrait_encoding(
    mae: MotionAutoEncoder, cropper: FaceCropper, portrait: bytes, source: str, field: str = "image"
) -> PortraitEncoding:
    """Portrait photo bytes -> the avatar's encoding: decode, crop the largest face, encode.

    The motion encoder and the decoder both call this, so a rebuilt encoding equals the
    original. `source` names the image in the no-face error (INVALID_ARGUMENT on `field`).
    """
    image = decode_image(portrait, field)
    try:
        crop = cropper.crop_portrait(image, source)
    except NoFaceError as exc:
        raise ValidationError(field, f"{exc}; expected a photo with a clearly visible, roughly frontal face") from None
    return encode_portrait(mae, crop)


# -- the service -------------------------------------------------------------------------------


class MotionEncoderServicer:
    """The MotionEncoder service over one model (its motion auto-encoder) and the session store."""

    def __init__(self, model: AvatarForcing, store: SessionStore, settings: Settings | None = None):
        self.mae = model.motion_autoencoder
        self.image_size = self.mae.config.image_size
        self.style_dim = self.mae.config.style_dim
        self.store = store
        self.settings = settings
        self.cropper = FaceCropper(self.image_size)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="motion-encoder")  # one model pass at a time

    async def _compute(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- RPCs ----------------------------------------------------------------------------

    @rpc_span("avatar_forcing.v1.MotionEncoder/EncodeUserMotion")
    async def EncodeUserMotion(self, request: pb.EncodeUserMotionRequest, context=None) -> pb.EncodeUserMotionResponse:
        check_message_size(request)
        check_id("session_id", request.session_id)
        check_id("tenant_id", request.tenant_id)
        if request.first_frame < 0:
            raise ValidationError("first_frame", f"got {request.first_frame}; expected >= 0")
        latents = await self._compute(self._encode_user_motion, request)
        return pb.EncodeUserMotionResponse(
            latents=encode(latents, "latents", dtype="FLOAT32"), first_frame=request.first_frame
        )

    async def EncodePortrait(self, request: pb.EncodePortraitRequest, context=None) -> pb.EncodePortraitResponse:
        check_message_size(request)
        check_id("tenant_id", request.tenant_id)
        avatar_id = request.avatar_id or derive_avatar_id(request.image)
        check_id("avatar_id", avatar_id)
        source = f"portrait of avatar {avatar_id!r} ({len(request.image)} bytes)"
        encoding = await self._compute(portrait_encoding, self.mae, self.cropper, request.image, source)
        await self.store.put_avatar(request.tenant_id, avatar_id, request.image)  # only portraits with a face
        return pb.EncodePortraitResponse(
            avatar_id=avatar_id, reference_motion=encode(encoding.reference_motion, "reference_motion", dtype="FLOAT32")
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- work (on the executor thread) ----------------------------------------------------

    def _user_crops(self, request: pb.EncodeUserMotionRequest) -> np.ndarray:
        """The request's face crops as uint8 (N, S, S, 3) at the model's image size, validated."""
        low, high = Limit.MIN_IMAGE_SIDE, Limit.MAX_IMAGE_SIDE
        which = request.WhichOneof("faces")
        if which is None:
            raise ValidationError("faces", "missing; expected a UINT8 crops tensor or encoded images")
        if which == "crops":
            crops = decode(
                request.crops,
                "crops",
                shape=(None, None, None, 3),
                dtypes=("UINT8",),
                max_bytes=Limit.MAX_CROPS_TENSOR_BYTES,
            )
            n, height, width = crops.shape[:3]
            if not 1 <= n <= Limit.MAX_FRAMES_PER_REQUEST:
                raise ValidationError(
                    "crops.shape", f"{n} crops; expected 1 to MAX_FRAMES_PER_REQUEST = {Limit.MAX_FRAMES_PER_REQUEST}"
                )
            if not (low <= height <= high and low <= width <= high):
                raise ValidationError("crops.shape", f"crops are {width}x{height}; expected sides in [{low}, {high}]")
            return np.stack([fit_crop(crop, self.image_size) for crop in crops])
        images = request.images.images
        if not 1 <= len(images) <= Limit.MAX_IMAGES_PER_REQUEST:
            raise ValidationError(
                "images.images",
                f"{len(images)} images; expected 1 to MAX_IMAGES_PER_REQUEST = {Limit.MAX_IMAGES_PER_REQUEST}",
            )
        return np.stack(
            [fit_crop(decode_image(data, f"images.images[{i}]"), self.image_size) for i, data in enumerate(images)]
        )

    def _encode_user_motion(self, request: pb.EncodeUserMotionRequest) -> np.ndarray:
        crops = self._user_crops(request)
        return encode_user_motion(self.mae, crops).numpy()  # (N, 512) float32

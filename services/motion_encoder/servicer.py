"""MotionEncoder: face images -> 512-d motion latents, and avatar portraits -> reference motion.

- EncodeUserMotion: the human's face crops (a UINT8 (N, H, W, 3) tensor, or JPEG/PNG images)
  -> user motion latents (N, 512), `avatar_forcing.engine.portrait.encode_user_motion`. Crops that are
  not the model's image size are resized (cv2.INTER_AREA) first.
- EncodePortrait: a portrait photo -> the avatar's reference motion r_s (512,). The largest
  face is cropped and encoded (`avatar_forcing.engine.portrait.encode_portrait_photo`), and the photo
  is stored in Redis under (tenant, avatar_id) so that decoders and generators can rebuild the
  avatar's encoding from it (`services.common.portraits.portrait_encoding`, the one function
  both sides use).

Images are validated and decoded by `services.wire.images` (sizes checked before decoding).

Ray-free; `deployment.py` adapts it to Ray Serve.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from avatar_forcing.engine.portrait import encode_user_motion
from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.nn.model import AvatarForcing
from services.common.config import Settings
from services.common.portraits import portrait_encoding
from services.common.telemetry import rpc_span
from services.store import SessionStore
from services.wire.errors import ValidationError
from services.wire.ids import check_id
from services.wire.images import check_side, decode_image, fit_crop
from services.wire.limits import check_message_size
from services.wire.protos import Limit, pb
from services.wire.tensors import decode, encode

log = logging.getLogger(__name__)


def derive_avatar_id(portrait: bytes) -> str:
    """The avatar id of a portrait given without one: a digest of its bytes (stable per image)."""
    return "av_" + hashlib.sha256(portrait).hexdigest()[:32]


# -- the service -------------------------------------------------------------------------------


class MotionEncoderServicer:
    """The MotionEncoder service over one model (its motion auto-encoder) and the session store."""

    def __init__(self, model: AvatarForcing, store: SessionStore, settings: Settings | None = None):
        self.mae = model.motion_autoencoder
        self.image_size = self.mae.config.image_size
        self.style_dim = self.mae.config.style_dim
        self.store = store
        self.settings = settings
        self.cropper = FaceCropper.for_model(self.mae.config)
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
            check_side("crops.shape", width, height)
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

"""FrameDecoder.Decode: motion latents + an avatar's identity -> RGB frames (raw or JPEG).

The avatar's `PortraitEncoding` (identity latent + feature maps) is cached per (tenant,
avatar_id) in an LRU bounded by bytes (`PortraitCache`). On a miss it is rebuilt from the
portrait photo in Redis (`SessionStore.get_avatar`) with the same function the motion encoder
used (`services.common.portraits.portrait_encoding`); concurrent misses of one avatar
build it once. The response must fit MAX_MESSAGE_BYTES: raw frames are checked before any
work, JPEG frames after encoding.

Ray-free; `deployment.py` adapts it to Ray Serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np

from avatar_forcing.engine.portrait import PortraitEncoding, decode_frames
from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.nn.model import AvatarForcing
from services.common.config import Settings
from services.common.portraits import portrait_encoding
from services.common.telemetry import rpc_span
from services.common.torch_tensors import decode_torch
from services.store import SessionStore
from services.wire.errors import FailedPreconditionError, ValidationError
from services.wire.ids import check_id
from services.wire.protos import Limit, pb

log = logging.getLogger(__name__)

DEFAULT_JPEG_QUALITY = 85
OUTPUT_FORMATS = (pb.RAW_RGB, pb.JPEG)
CacheKey = tuple[str, str]  # (tenant_id, avatar_id)


class PortraitCache:
    """LRU of avatar encodings within a byte budget (`PortraitEncoding.nbytes`).

    Inserting evicts least recently used entries until the total fits; an encoding larger
    than the whole budget is not cached (the caller still uses it for its request).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes: got {max_bytes}; expected > 0")
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self._entries: OrderedDict[CacheKey, tuple[PortraitEncoding, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def get(self, key: CacheKey) -> PortraitEncoding | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: CacheKey, encoding: PortraitEncoding) -> list[CacheKey]:
        """Cache `encoding`; returns the keys evicted to make room."""
        self.pop(key)
        nbytes = encoding.nbytes()
        if nbytes > self.max_bytes:
            log.warning("avatar %s/%s: encoding of %d bytes exceeds the cache budget of %d bytes; not cached",
                        key[0], key[1], nbytes, self.max_bytes)  # fmt: skip
            return []
        evicted = []
        while self.bytes_used + nbytes > self.max_bytes:
            old, (_, old_bytes) = self._entries.popitem(last=False)
            self.bytes_used -= old_bytes
            evicted.append(old)
        self._entries[key] = (encoding, nbytes)
        self.bytes_used += nbytes
        return evicted

    def pop(self, key: CacheKey) -> PortraitEncoding | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.bytes_used -= entry[1]
        return entry[0]


def encode_frame(frame: np.ndarray, image_format: int, quality: int) -> pb.Image:
    """uint8 RGB (H, W, 3) -> Image (RAW_RGB or JPEG)."""
    height, width = frame.shape[:2]
    if image_format == pb.RAW_RGB:
        data = np.ascontiguousarray(frame).tobytes()
    else:
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("OpenCV could not encode a frame as JPEG")
        data = encoded.tobytes()
    return pb.Image(format=image_format, width=width, height=height, data=data)


class DecoderServicer:
    """The FrameDecoder service over one model (its motion auto-encoder) and the session store."""

    def __init__(
        self,
        model: AvatarForcing,
        store: SessionStore,
        settings: Settings | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        self.mae = model.motion_autoencoder
        self.image_size = self.mae.config.image_size
        self.motion_dim = self.mae.config.style_dim
        self.store = store
        self.settings = settings or Settings()
        self.cache = PortraitCache(cache_bytes if cache_bytes is not None else self.settings.cache_budget_bytes)
        self.cropper = FaceCropper(self.image_size)
        self._building: dict[CacheKey, asyncio.Future[PortraitEncoding]] = {}  # builds in flight
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="decoder")  # one model pass at a time

    async def _compute(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- RPCs ----------------------------------------------------------------------------

    @rpc_span("avatar_forcing.v1.FrameDecoder/Decode")
    async def Decode(self, request: pb.DecodeRequest, context=None) -> pb.DecodeResponse:
        check_id("session_id", request.session_id)
        check_id("tenant_id", request.tenant_id)
        check_id("avatar_id", request.avatar_id)
        if request.first_frame < 0:
            raise ValidationError("first_frame", f"got {request.first_frame}; expected >= 0")
        image_format = request.format or pb.JPEG
        if image_format not in OUTPUT_FORMATS:
            name = pb.ImageFormat.Name(image_format) if image_format in pb.ImageFormat.values() else image_format
            raise ValidationError("format", f"got {name}; expected RAW_RGB or JPEG")
        quality = request.quality or DEFAULT_JPEG_QUALITY
        if not 1 <= quality <= Limit.MAX_JPEG_QUALITY:
            raise ValidationError(
                "quality", f"got {quality}; expected 0 (default) or 1 to MAX_JPEG_QUALITY = {Limit.MAX_JPEG_QUALITY}"
            )
        latents = decode_torch(request.latents, "latents", shape=(None, self.motion_dim), dtypes=("FLOAT32",))
        n = latents.shape[0]
        if not 1 <= n <= Limit.MAX_FRAMES_PER_REQUEST:
            raise ValidationError(
                "latents.shape", f"{n} rows; expected 1 to MAX_FRAMES_PER_REQUEST = {Limit.MAX_FRAMES_PER_REQUEST}"
            )
        if image_format == pb.RAW_RGB:
            self._check_size(n * self.image_size * self.image_size * 3, n)  # before any work

        portrait = await self.portrait(request.tenant_id, request.avatar_id)
        response = await self._compute(self._decode, portrait, latents, request.first_frame, image_format, quality)
        self._check_size(response.ByteSize(), n)
        return response

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the avatar cache ----------------------------------------------------------------

    async def portrait(self, tenant_id: str, avatar_id: str) -> PortraitEncoding:
        """The avatar's encoding: cached, or rebuilt from its portrait in Redis (once per miss)."""
        key = (tenant_id, avatar_id)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        task = self._building.get(key)
        if task is None:  # the first miss builds; concurrent misses wait for the same build
            task = asyncio.ensure_future(self._build_and_cache(key))
            self._building[key] = task
            task.add_done_callback(lambda done: self._build_done(key, done))
        return await asyncio.shield(task)  # a cancelled caller does not cancel the others' build

    def _build_done(self, key: CacheKey, task: asyncio.Future[PortraitEncoding]) -> None:
        if self._building.get(key) is task:
            del self._building[key]
        if not task.cancelled():
            task.exception()  # retrieved here: the waiters re-raise it; no "never retrieved" warning

    async def _build_and_cache(self, key: CacheKey) -> PortraitEncoding:
        encoding = await self._build(*key)
        evicted = self.cache.put(key, encoding)
        if evicted:
            log.info("portrait cache: evicted %d avatars to fit %s/%s", len(evicted), *key)
        return encoding

    async def _build(self, tenant_id: str, avatar_id: str) -> PortraitEncoding:
        data = await self.store.get_avatar(tenant_id, avatar_id)  # NotFoundError: unknown avatar
        source = f"stored portrait of avatar {avatar_id!r}"
        try:
            return await self._compute(portrait_encoding, self.mae, self.cropper, data, source, "avatar_id")
        except ValidationError as exc:  # stored by something that did not check it
            raise FailedPreconditionError(f"avatar_id: the stored portrait cannot be used ({exc})") from exc

    # -- work (on the executor thread) ----------------------------------------------------

    def _decode(
        self, portrait: PortraitEncoding, latents: Any, first_frame: int, image_format: int, quality: int
    ) -> pb.DecodeResponse:
        frames = decode_frames(self.mae, portrait, latents)  # (n, S, S, 3) uint8
        return pb.DecodeResponse(
            frames=[
                pb.DecodedFrame(frame_index=first_frame + i, image=encode_frame(frame, image_format, quality))
                for i, frame in enumerate(frames)
            ]
        )

    def _check_size(self, nbytes: int, n: int) -> None:
        if nbytes > Limit.MAX_MESSAGE_BYTES:
            raise ValidationError(
                "latents.shape",
                f"{n} frames make a response of {nbytes} bytes, over MAX_MESSAGE_BYTES = {Limit.MAX_MESSAGE_BYTES}; "
                "ask for fewer frames per call (or JPEG)",
            )

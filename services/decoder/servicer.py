"""FrameDecoder.Decode: motion latents + an avatar's identity -> RGB frames (raw or JPEG).

The avatar's `PortraitEncoding` (identity latent + feature maps) is cached per (tenant,
avatar_id) in an LRU bounded by bytes (`PortraitCache`), each entry tagged with the sha256 of
the portrait it was built from. Every Decode reads the avatar's current digest
(`SessionStore.avatar_digest`, one small read) and uses an entry only when the digests match,
so a replaced portrait never serves the old encoding, even when the invalidation message
(P:avatar-invalidated, which the servicer subscribes to: `watch_invalidations`) is missed; a
deleted avatar is NOT_FOUND at once. On a miss the encoding is rebuilt from the portrait photo
in Redis (`SessionStore.get_avatar`) with the same function the motion encoder used
(`services.common.portraits.portrait_encoding`); concurrent misses of one avatar build it once.
The response must fit MAX_MESSAGE_BYTES: raw frames are checked before any work, JPEG frames
after encoding.

Ray-free; `deployment.py` adapts it to Ray Serve.
"""

from __future__ import annotations

import asyncio
import hashlib
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
from services.wire.errors import FailedPreconditionError, StoreUnavailable, ValidationError
from services.wire.ids import check_id
from services.wire.protos import Limit, pb

log = logging.getLogger(__name__)

DEFAULT_JPEG_QUALITY = 85
OUTPUT_FORMATS = (pb.RAW_RGB, pb.JPEG)
CacheKey = tuple[str, str]  # (tenant_id, avatar_id)
INVALIDATION_RETRY_S = 1.0  # how soon the invalidation watcher subscribes again after losing Redis


class PortraitCache:
    """LRU of avatar encodings within a byte budget (`PortraitEncoding.nbytes`).

    Inserting evicts least recently used entries until the total fits; an encoding larger
    than the whole budget is not cached (the caller still uses it for its request). Each entry
    carries the digest of the portrait it was built from; `get(key, digest)` with another
    digest drops the entry and misses.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes: got {max_bytes}; expected > 0")
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self._entries: OrderedDict[CacheKey, tuple[PortraitEncoding, int, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def get(self, key: CacheKey, digest: str | None = None) -> PortraitEncoding | None:
        """The cached encoding; None when absent or (with `digest`) built from another portrait."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if digest is not None and entry[2] != digest:
            self.pop(key)  # a replaced portrait: the old encoding must never be served
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def digest(self, key: CacheKey) -> str | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[2]

    def put(self, key: CacheKey, encoding: PortraitEncoding, digest: str = "") -> list[CacheKey]:
        """Cache `encoding` (built from the portrait with this digest); returns the keys evicted to make room."""
        self.pop(key)
        nbytes = encoding.nbytes()
        if nbytes > self.max_bytes:
            log.warning("avatar %s/%s: encoding of %d bytes exceeds the cache budget of %d bytes; not cached",
                        key[0], key[1], nbytes, self.max_bytes)  # fmt: skip
            return []
        evicted = []
        while self.bytes_used + nbytes > self.max_bytes:
            old, (_, old_bytes, _) = self._entries.popitem(last=False)
            self.bytes_used -= old_bytes
            evicted.append(old)
        self._entries[key] = (encoding, nbytes, digest)
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
        self.cropper = FaceCropper.for_model(self.mae.config)
        self._building: dict[tuple[str, str, str], asyncio.Future[PortraitEncoding]] = {}  # builds in flight
        self._watcher: asyncio.Task | None = None  # watch_invalidations, started by the first Decode
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

        self._start_watcher()
        portrait = await self.portrait(request.tenant_id, request.avatar_id)
        response = await self._compute(self._decode, portrait, latents, request.first_frame, image_format, quality)
        self._check_size(response.ByteSize(), n)
        return response

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the avatar cache ----------------------------------------------------------------

    async def portrait(self, tenant_id: str, avatar_id: str) -> PortraitEncoding:
        """The avatar's encoding for its current portrait: cached, or rebuilt from Redis (once per miss)."""
        digest = await self.store.avatar_digest(tenant_id, avatar_id)  # NotFoundError: unknown or deleted
        key = (tenant_id, avatar_id)
        cached = self.cache.get(key, digest)
        if cached is not None:
            return cached
        build = (tenant_id, avatar_id, digest)
        task = self._building.get(build)
        if task is None:  # the first miss builds; concurrent misses wait for the same build
            task = asyncio.ensure_future(self._build_and_cache(key, digest))
            self._building[build] = task
            task.add_done_callback(lambda done: self._build_done(build, done))
        return await asyncio.shield(task)  # a cancelled caller does not cancel the others' build

    def invalidate(self, tenant_id: str, avatar_id: str) -> bool:
        """Drop the avatar's cached encoding (its portrait was replaced or deleted); True if one was cached."""
        return self.cache.pop((tenant_id, avatar_id)) is not None

    def _build_done(self, build: tuple[str, str, str], task: asyncio.Future[PortraitEncoding]) -> None:
        if self._building.get(build) is task:
            del self._building[build]
        if not task.cancelled():
            task.exception()  # retrieved here: the waiters re-raise it; no "never retrieved" warning

    async def _build_and_cache(self, key: CacheKey, digest: str) -> PortraitEncoding:
        encoding, built_from = await self._build(*key)
        if built_from != digest:  # replaced between the two reads: cache it under what it was built from
            log.info("portrait of %s/%s replaced while its encoding was built", *key)
        evicted = self.cache.put(key, encoding, built_from)
        if evicted:
            log.info("portrait cache: evicted %d avatars to fit %s/%s", len(evicted), *key)
        return encoding

    async def _build(self, tenant_id: str, avatar_id: str) -> tuple[PortraitEncoding, str]:
        """The encoding of the avatar's stored portrait, and the digest of the bytes it was built from."""
        data = await self.store.get_avatar(tenant_id, avatar_id)  # NotFoundError: unknown avatar
        digest = hashlib.sha256(data).hexdigest()
        source = f"stored portrait of avatar {avatar_id!r}"
        try:
            encoding = await self._compute(portrait_encoding, self.mae, self.cropper, data, source, "avatar_id")
        except ValidationError as exc:  # stored by something that did not check it
            raise FailedPreconditionError(f"avatar_id: the stored portrait cannot be used ({exc})") from exc
        return encoding, digest

    # -- invalidation --------------------------------------------------------------------

    def _start_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self.watch_invalidations())

    async def watch_invalidations(self, subscribed: asyncio.Event | None = None) -> None:
        """Drop encodings of avatars replaced or deleted (P:avatar-invalidated) until cancelled.

        Redis outages are retried; what is missed meanwhile is still caught by the digest check."""
        while True:
            try:
                async for tenant_id, avatar_id in self.store.avatar_invalidations(subscribed):
                    if self.invalidate(tenant_id, avatar_id):
                        log.info("portrait cache: dropped %s/%s (replaced or deleted)", tenant_id, avatar_id)
            except StoreUnavailable as exc:
                log.warning("portrait cache: invalidation messages interrupted: %s", exc)
            await asyncio.sleep(INVALIDATION_RETRY_S)

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

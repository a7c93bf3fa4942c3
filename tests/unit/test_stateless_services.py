"""The stateless services' servicers, called directly with the tiny random model (no Ray).

- AudioFeatures.Extract gives exactly what `StreamingAudioFeatures` (hop 10, default context
  and look-ahead) gives in-process, block by block, when sent the window the stream uses.
- MotionEncoder equals `encode_user_motion` / `encode_portrait` on the same crops, and stores
  the portrait in Redis; FrameDecoder equals `decode_frames` and rebuilds the avatar from Redis.
- Every bad input is INVALID_ARGUMENT (or NOT_FOUND) with a message naming the field.
- The decoder's avatar cache is an LRU bounded by bytes.

The portrait tests use the real Redis (AF_TEST_REDIS_URL, default DB 12) under a unique key
prefix; when none answers, a redis-server is started (tests/redis_support.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
import torch

from avatar_forcing.engine.portrait import PortraitEncoding, decode_frames, encode_portrait, encode_user_motion
from avatar_forcing.engine.streaming_audio import StreamingAudioFeatures
from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.media.io import load_image
from services.audio_features.servicer import AudioFeaturesServicer
from services.common.config import Settings
from services.common.model_loader import load_model
from services.decoder.servicer import DEFAULT_JPEG_QUALITY, DecoderServicer, PortraitCache
from services.motion_encoder.servicer import MotionEncoderServicer, derive_avatar_id
from services.store import MAX_PORTRAIT_BYTES, SessionStore
from services.wire.errors import NotFoundError, ServiceError, ValidationError, status_of
from services.wire.protos import Limit, pb
from services.wire.tensors import decode, encode

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
HOP = 10
IDS = {"session_id": "sess-1", "tenant_id": "tenant-a"}


@pytest.fixture(scope="module")
def model():
    return load_model(Settings(model_preset="tiny"), device="cpu")


@pytest.fixture(scope="module")
def size(model) -> int:
    return model.motion_autoencoder.config.image_size  # 64 for tiny


@pytest.fixture(scope="module")
def portrait_png() -> bytes:
    return (SAMPLES / "portrait.png").read_bytes()


def with_store(redis_url: str, prefix: str, body: Callable[[SessionStore], Awaitable[Any]]) -> Any:
    """Run `body(store)` in a fresh event loop with a store bound to it."""

    async def main() -> Any:
        async with SessionStore(redis_url, prefix=prefix) as store:
            return await body(store)

    return asyncio.run(main())


def expect_error(call: Awaitable[Any], field: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    """Await `call`; it must fail with `code` and a message starting with `field`."""

    async def main() -> None:
        await call

    with pytest.raises(ServiceError) as info:
        asyncio.run(main())
    got_code, message = status_of(info.value)
    assert got_code == code, message
    assert message.startswith(f"{field}:"), message
    return message


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


# -- AudioFeatures -------------------------------------------------------------------------------


def speech_like(num_samples: int) -> np.ndarray:
    """Deterministic audio, quantised to int16 so that pcm_s16le and float samples are the same."""
    t = np.arange(num_samples) / Limit.SAMPLE_RATE
    rng = np.random.default_rng(7)
    wave = 0.4 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)
    return (np.round(np.clip(wave, -1, 1) * 32767) / 32768.0).astype(np.float32)


def extract_request(wave: np.ndarray, first: int, num_frames: int, left: int, pcm: bool, **fields: Any):
    request = pb.ExtractFeaturesRequest(
        **IDS, source=pb.AVATAR, sample_rate=16000, first_frame=first, num_frames=num_frames, left_context_samples=left
    )
    if pcm:
        request.pcm_s16le = np.round(wave * 32768).astype("<i2").tobytes()
    else:
        request.samples.CopyFrom(encode(wave, "samples"))
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def test_extract_equals_the_in_process_stream(model) -> None:
    audio = speech_like(65 * 640 + 300)  # 66 frames, the last one partial: the stream ends with a flush
    stream = StreamingAudioFeatures(model.audio_encoder, hop_frames=HOP)
    pushed = [stream.push(audio[i : i + 5000]) for i in range(0, audio.size, 5000)]
    expected = torch.cat([*pushed, stream.flush()])  # (66, 512)
    total = -(-audio.size // 640)
    assert expected.shape == (total, 512)

    servicer = AudioFeaturesServicer(model)
    context, lookahead = stream.left_context_frames, stream.lookahead_frames
    got = []
    for block, first in enumerate(range(0, total, HOP)):
        # The window the stream encodes for this block: context before it, look-ahead after it.
        start, end = max(0, first - context), min(first + HOP + lookahead, total)
        window = audio[start * 640 : min(end * 640, audio.size)]
        num_frames = min(HOP, total - first)
        request = extract_request(window, first, num_frames, (first - start) * 640, pcm=block % 2 == 0)
        response = asyncio.run(servicer.Extract(request))
        assert response.first_frame == first
        got.append(torch.from_numpy(decode(response.features, "features", shape=(num_frames, 512))))
    servicer.close()
    assert torch.equal(torch.cat(got), expected)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"session_id": "bad id!"}, "session_id"),
        ({"tenant_id": ""}, "tenant_id"),
        ({"source": pb.AUDIO_SOURCE_UNSPECIFIED}, "source"),
        ({"sample_rate": 8000}, "sample_rate"),
        ({"first_frame": -1}, "first_frame"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": 51}, "num_frames"),
        ({"num_frames": 4}, "num_frames"),  # the waveform covers 3 frames after the context
        ({"left_context_samples": 100}, "left_context_samples"),  # not a multiple of 640
        ({"left_context_samples": 640 * 11}, "left_context_samples"),  # before the session's first sample
        ({"pcm_s16le": b"\x00" * 1281}, "pcm_s16le"),  # odd length
        ({"pcm_s16le": b"\x00\x00" * (Limit.MAX_WAVEFORM_SAMPLES + 1)}, "pcm_s16le"),
        ({"pcm_s16le": b""}, "pcm_s16le"),
        ({"samples": encode(np.zeros(640, np.uint8), "s")}, "samples.dtype"),
        ({"samples": encode(np.zeros((2, 640), np.float32), "s")}, "samples.shape"),
        ({"samples": encode(np.full(640, 1.5, np.float32), "s")}, "samples"),
        (
            {"samples": pb.Tensor(shape=[640], dtype=pb.Tensor.FLOAT32, data=np.full(640, np.nan, "<f4").tobytes())},
            "samples",
        ),
        ({"samples": pb.Tensor(shape=[640], dtype=pb.Tensor.FLOAT32, data=b"\x00" * 12)}, "samples.data"),
    ],
)
def test_extract_rejects_bad_input(model, change: dict[str, Any], field: str) -> None:
    request = extract_request(np.zeros(640 * 5, np.float32), 10, 3, 640 * 2, pcm=True)
    for name, value in change.items():
        if isinstance(value, pb.Tensor):
            request.samples.CopyFrom(value)
        else:
            setattr(request, name, value)
    expect_error(AudioFeaturesServicer(model).Extract(request), field)


def test_extract_needs_a_waveform(model) -> None:
    request = extract_request(np.zeros(640, np.float32), 0, 1, 0, pcm=True)
    request.ClearField("pcm_s16le")
    expect_error(AudioFeaturesServicer(model).Extract(request), "waveform")


# -- MotionEncoder -------------------------------------------------------------------------------


def user_crops(n: int, side: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_encode_user_motion_equals_the_library(model, size: int) -> None:
    servicer = MotionEncoderServicer(model, store=None)
    mae = model.motion_autoencoder
    crops = user_crops(3, size)
    request = pb.EncodeUserMotionRequest(**IDS, crops=encode(crops, "crops"), first_frame=7)
    response = asyncio.run(servicer.EncodeUserMotion(request))
    assert response.first_frame == 7
    latents = decode(response.latents, "latents", shape=(3, 512))
    assert np.array_equal(latents, encode_user_motion(mae, crops).numpy())

    # Other sizes are resized with INTER_AREA first; PNG images decode to the same pixels.
    large = user_crops(2, size + 16)
    resized = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in large])
    request = pb.EncodeUserMotionRequest(**IDS, images=pb.EncodedImages(images=[png(c) for c in large]))
    latents = decode(asyncio.run(servicer.EncodeUserMotion(request)).latents, "latents", shape=(2, 512))
    assert np.array_equal(latents, encode_user_motion(mae, resized).numpy())
    servicer.close()


def jpeg_header_only(width: int, height: int) -> bytes:
    """A JPEG start with an SOF0 frame header of the given size (nothing decodable after it)."""
    sof = b"\xff\xc0\x00\x11\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03" + b"\x00" * 9
    return b"\xff\xd8" + b"\xff\xe0\x00\x04\x00\x00" + sof


@pytest.mark.parametrize(
    ("faces", "field"),
    [
        (None, "faces"),
        ({"crops": encode(np.zeros((2, 32, 32, 3), np.float32), "c")}, "crops.dtype"),
        ({"crops": encode(np.zeros((2, 32, 32, 4), np.uint8), "c")}, "crops.shape"),
        ({"crops": encode(np.zeros((0, 32, 32, 3), np.uint8), "c")}, "crops.shape"),
        ({"crops": encode(np.zeros((51, 16, 16, 3), np.uint8), "c")}, "crops.shape"),
        ({"crops": encode(np.zeros((1, 8, 32, 3), np.uint8), "c")}, "crops.shape"),
        ({"crops": pb.Tensor(shape=[11, 512, 512, 3], dtype=pb.Tensor.UINT8)}, "crops"),  # over 7.5 MiB
        ({"images": pb.EncodedImages(images=[])}, "images.images"),
        ({"images": pb.EncodedImages(images=[b"not an image"])}, "images.images[0]"),
        ({"images": pb.EncodedImages(images=[png(np.zeros((32, 32, 3), np.uint8)), b""])}, "images.images[1]"),
        ({"images": pb.EncodedImages(images=[png(np.zeros((8, 32, 3), np.uint8))])}, "images.images[0]"),
        ({"images": pb.EncodedImages(images=[jpeg_header_only(2000, 30)])}, "images.images[0]"),
        ({"images": pb.EncodedImages(images=[jpeg_header_only(64, 64)])}, "images.images[0]"),  # undecodable
        (
            {"images": pb.EncodedImages(images=[b"\x89PNG\r\n\x1a\n" + b"\x00" * Limit.MAX_IMAGE_BYTES])},
            "images.images[0]",
        ),
        ({"images": pb.EncodedImages(images=[png(np.zeros((16, 16, 3), np.uint8))] * 51)}, "images.images"),
        ({"images": pb.EncodedImages(images=[b"\xff\xd8" + b"\x00" * (Limit.MAX_IMAGE_BYTES - 2)] * 9)}, "request"),
    ],
)
def test_encode_user_motion_rejects_bad_input(model, faces: dict[str, Any] | None, field: str) -> None:
    request = pb.EncodeUserMotionRequest(**IDS, **(faces or {}))
    expect_error(MotionEncoderServicer(model, store=None).EncodeUserMotion(request), field)


def test_encode_user_motion_checks_ids_and_frame(model, size: int) -> None:
    crops = encode(user_crops(1, size), "crops")
    servicer = MotionEncoderServicer(model, store=None)
    expect_error(servicer.EncodeUserMotion(pb.EncodeUserMotionRequest(tenant_id="t", crops=crops)), "session_id")
    bad_frame = pb.EncodeUserMotionRequest(**IDS, crops=crops, first_frame=-3)
    expect_error(servicer.EncodeUserMotion(bad_frame), "first_frame")


def test_encode_portrait_equals_the_library_and_stores_the_portrait(
    model, size, portrait_png, redis_url, prefix
) -> None:
    mae = model.motion_autoencoder
    crop = FaceCropper(size).crop_portrait(load_image(SAMPLES / "portrait.png"), "portrait.png")
    expected = encode_portrait(mae, crop).reference_motion.numpy()

    async def body(store: SessionStore) -> None:
        servicer = MotionEncoderServicer(model, store)
        named = await servicer.EncodePortrait(
            pb.EncodePortraitRequest(tenant_id="t1", image=portrait_png, avatar_id="a1")
        )
        assert named.avatar_id == "a1"
        assert np.array_equal(decode(named.reference_motion, "reference_motion", shape=(512,)), expected)
        assert await store.get_avatar("t1", "a1") == portrait_png

        unnamed = await servicer.EncodePortrait(pb.EncodePortraitRequest(tenant_id="t1", image=portrait_png))
        assert unnamed.avatar_id == derive_avatar_id(portrait_png)  # the same photo, the same id
        assert await store.get_avatar("t1", unnamed.avatar_id) == portrait_png
        with pytest.raises(NotFoundError, match="avatar_id"):
            await store.get_avatar("t2", "a1")  # avatars are per tenant
        servicer.close()

    with_store(redis_url, prefix, body)


def test_avatar_portraits_in_the_store(redis_url, prefix) -> None:
    async def body(store: SessionStore) -> None:
        with pytest.raises(ValidationError, match=r"^portrait:"):
            await store.put_avatar("t1", "a1", b"")
        with pytest.raises(ValidationError, match=r"^portrait:"):
            await store.put_avatar("t1", "a1", b"x" * (MAX_PORTRAIT_BYTES + 1))
        with pytest.raises(ValidationError, match=r"^avatar_id:"):
            await store.put_avatar("t1", "a:1", b"x")
        await store.put_avatar("t1", "a1", b"first")
        await store.put_avatar("t1", "a1", b"second")  # replaced
        assert await store.get_avatar("t1", "a1") == b"second"
        assert await store.redis.get(f"{prefix}:tenant:t1:avatar:a1") == b"second"  # the documented key
        with pytest.raises(NotFoundError, match=r"^avatar_id:"):
            await store.get_avatar("t2", "a1")

    with_store(redis_url, prefix, body)


def test_encode_portrait_rejects_bad_input(model, portrait_png, redis_url, prefix) -> None:
    blank = png(np.full((64, 64, 3), 200, np.uint8))

    async def body(store: SessionStore) -> None:
        servicer = MotionEncoderServicer(model, store)
        message = await _error(
            servicer.EncodePortrait(pb.EncodePortraitRequest(tenant_id="t1", image=blank, avatar_id="x"))
        )
        assert message.startswith("image:") and "no face" in message and "'x'" in message, message
        cases = [
            (pb.EncodePortraitRequest(tenant_id="t1", image=b""), "image"),
            (pb.EncodePortraitRequest(tenant_id="t1", image=b"GIF89a" + b"\x00" * 64), "image"),
            (pb.EncodePortraitRequest(tenant_id="t1", image=portrait_png, avatar_id="a/b"), "avatar_id"),
            (pb.EncodePortraitRequest(tenant_id="", image=portrait_png), "tenant_id"),
        ]
        for request, field in cases:
            message = await _error(servicer.EncodePortrait(request))
            assert message.startswith(f"{field}:"), message
        keys = [k async for k in store.redis.scan_iter(f"{prefix}:*")]
        assert keys == []  # nothing stored for rejected portraits
        servicer.close()

    with_store(redis_url, prefix, body)


async def _error(call: Awaitable[Any]) -> str:
    try:
        await call
    except ServiceError as exc:
        code, message = status_of(exc)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        return message
    raise AssertionError("expected INVALID_ARGUMENT")


# -- FrameDecoder --------------------------------------------------------------------------------


def latents(n: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(n).standard_normal((n, 512))).astype(np.float32)


def decode_request(n: int, **fields: Any) -> pb.DecodeRequest:
    return pb.DecodeRequest(**IDS, avatar_id="a1", latents=encode(latents(n), "latents"), **fields)


class CountingStore:
    """The real store, counting portrait reads (cache misses)."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.reads: list[str] = []

    async def get_avatar(self, tenant_id: str, avatar_id: str) -> bytes:
        self.reads.append(avatar_id)
        return await self.store.get_avatar(tenant_id, avatar_id)

    def __getattr__(self, name: str):  # everything else (the digest lookups) as the real store
        return getattr(self.store, name)


def test_decode_equals_the_library(model, size, portrait_png, redis_url, prefix) -> None:
    mae = model.motion_autoencoder
    crop = FaceCropper(size).crop_portrait(load_image(SAMPLES / "portrait.png"), "portrait.png")
    expected = decode_frames(mae, encode_portrait(mae, crop), torch.from_numpy(latents(4)))  # (4, S, S, 3)

    async def body(store: SessionStore) -> None:
        await store.put_avatar("tenant-a", "a1", portrait_png)
        counting = CountingStore(store)
        servicer = DecoderServicer(model, counting, cache_bytes=1 << 30)
        raw = await servicer.Decode(decode_request(4, first_frame=20, format=pb.RAW_RGB))
        assert [f.frame_index for f in raw.frames] == [20, 21, 22, 23]
        for frame, image in zip(expected, (f.image for f in raw.frames), strict=True):
            assert (image.format, image.width, image.height) == (pb.RAW_RGB, size, size)
            assert np.frombuffer(image.data, np.uint8).reshape(size, size, 3).tobytes() == frame.tobytes()

        jpeg = await servicer.Decode(decode_request(4, first_frame=20))  # default format: JPEG
        for frame, image in zip(expected, (f.image for f in jpeg.frames), strict=True):
            assert (image.format, image.width, image.height) == (pb.JPEG, size, size)
            # the library's frame as OpenCV encodes it at the default quality, byte for byte (how close
            # a JPEG comes to the pixels depends on the random weights' image, not on the service)
            ok, want = cv2.imencode(
                ".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, DEFAULT_JPEG_QUALITY]
            )
            assert ok and image.data == want.tobytes()
        assert counting.reads == ["a1"]  # the second call used the cached encoding
        servicer.close()

    with_store(redis_url, prefix, body)


def test_decode_errors(model, size, portrait_png, redis_url, prefix, monkeypatch) -> None:
    async def body(store: SessionStore) -> None:
        await store.put_avatar("tenant-a", "a1", portrait_png)
        servicer = DecoderServicer(model, store, cache_bytes=1 << 30)
        cases = [
            (decode_request(2, first_frame=-1), "first_frame"),
            (decode_request(2, format=pb.PNG), "format"),
            (decode_request(2, format=7), "format"),
            (decode_request(2, quality=101), "quality"),
            (decode_request(0), "latents.shape"),
            (decode_request(51), "latents.shape"),
            (pb.DecodeRequest(**IDS, avatar_id="a1", latents=encode(latents(2)[:, :256], "l")), "latents.shape"),
            (
                pb.DecodeRequest(**IDS, avatar_id="a1", latents=encode(latents(2), "l", dtype="FLOAT16")),
                "latents.dtype",
            ),
            (pb.DecodeRequest(**IDS, avatar_id="a b", latents=encode(latents(2), "l")), "avatar_id"),
            (pb.DecodeRequest(tenant_id="tenant-a", avatar_id="a1", latents=encode(latents(2), "l")), "session_id"),
        ]
        for request, field in cases:
            message = await _error(servicer.Decode(request))
            assert message.startswith(f"{field}:"), message

        # Unknown avatars, and other tenants' avatars, are NOT_FOUND.
        for tenant, avatar in (("tenant-a", "nobody"), ("tenant-b", "a1")):
            request = pb.DecodeRequest(
                session_id="s", tenant_id=tenant, avatar_id=avatar, latents=encode(latents(1), "l")
            )
            with pytest.raises(NotFoundError) as info:
                await servicer.Decode(request)
            assert status_of(info.value)[0] == grpc.StatusCode.NOT_FOUND
            assert str(info.value).startswith("avatar_id:")

        # A response over MAX_MESSAGE_BYTES: raw frames are refused before any work ...
        servicer.image_size = 512  # as the paper model: 50 raw frames are 37.5 MiB
        message = await _error(servicer.Decode(decode_request(50, format=pb.RAW_RGB)))
        assert "MAX_MESSAGE_BYTES" in message and message.startswith("latents.shape:"), message
        servicer.image_size = size
        # ... JPEG frames after encoding.
        monkeypatch.setattr(Limit, "MAX_MESSAGE_BYTES", 2000)
        message = await _error(servicer.Decode(decode_request(10)))
        assert "MAX_MESSAGE_BYTES = 2000" in message, message
        servicer.close()

    with_store(redis_url, prefix, body)


def fake_encoding(nbytes: int) -> PortraitEncoding:
    return PortraitEncoding(torch.zeros(nbytes // 4), [], torch.zeros(512))


def test_portrait_cache_evicts_least_recently_used_by_bytes() -> None:
    cache = PortraitCache(max_bytes=1000)
    assert cache.put(("t", "a"), fake_encoding(400)) == []
    assert cache.put(("t", "b"), fake_encoding(400)) == []
    assert cache.get(("t", "a")) is not None  # a is now the most recent
    assert cache.put(("t", "c"), fake_encoding(400)) == [("t", "b")]
    assert (("t", "a") in cache, ("t", "b") in cache, ("t", "c") in cache) == (True, False, True)
    assert cache.bytes_used == 800
    assert cache.put(("t", "d"), fake_encoding(1000)) == [("t", "a"), ("t", "c")]  # exactly the budget
    assert cache.put(("t", "e"), fake_encoding(1200)) == []  # larger than the budget: not cached
    assert ("t", "e") not in cache and len(cache) == 1 and cache.bytes_used == 1000
    cache.put(("t", "d"), fake_encoding(200))  # replacing an entry re-counts it
    assert cache.bytes_used == 200


def test_decoder_cache_rebuilds_evicted_avatars_once(model, portrait_png, redis_url, prefix) -> None:
    flipped = png(load_image(SAMPLES / "portrait.png")[:, ::-1].copy())

    async def body(store: SessionStore) -> None:
        await store.put_avatar("tenant-a", "a1", portrait_png)
        await store.put_avatar("tenant-a", "a2", flipped)
        counting = CountingStore(store)
        probe = DecoderServicer(model, counting, cache_bytes=1 << 30)
        one = (await probe.portrait("tenant-a", "a1")).nbytes()
        probe.close()

        counting.reads.clear()
        servicer = DecoderServicer(model, counting, cache_bytes=one + one // 2)  # room for one avatar
        # Concurrent misses of one avatar read and build it once.
        await asyncio.gather(*(servicer.Decode(decode_request(1, format=pb.RAW_RGB)) for _ in range(3)))
        assert counting.reads == ["a1"]
        await servicer.Decode(pb.DecodeRequest(**IDS, avatar_id="a2", latents=encode(latents(1), "l")))
        assert list(servicer.cache._entries) == [("tenant-a", "a2")] and servicer.cache.bytes_used <= one + one // 2
        await servicer.Decode(decode_request(1))  # a1 was evicted: rebuilt from Redis
        assert counting.reads == ["a1", "a2", "a1"]
        servicer.close()

    with_store(redis_url, prefix, body)

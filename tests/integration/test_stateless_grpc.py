"""The stateless deployments behind Serve's real gRPC proxy: a local Ray, real Redis, real stubs.

AudioFeatures, MotionEncoder and FrameDecoder run on one Serve instance whose gRPC proxy
listens on a free loopback port; the tests call it with the generated stubs. Serve's gRPC
proxy dispatches a call to the *ingress* deployment of the application named in the call's
`application` metadata, so each deployment is the ingress of its own application here.

Checked: a valid call to each RPC (the portrait stored by MotionEncoder is what FrameDecoder
decodes with), features equal to the in-process computation (every process builds the same
seeded weights), malformed messages answered with INVALID_ARGUMENT naming the field (and the
service answering normally afterwards), unknown avatars with NOT_FOUND, and typed errors
reaching a deployment-handle caller (how the session ingress calls these services).

Redis: AF_TEST_REDIS_URL (default redis://127.0.0.1:6379/12) under a unique key prefix.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import torch

from services.common.config import Settings
from services.local.ports import free_port
from services.local.ray_start import init_local_ray
from services.wire.errors import NotFoundError, ValidationError
from services.wire.protos import Limit, grpc_options, pb, pb_grpc, servicer_function
from services.wire.tensors import decode, encode

pytestmark = pytest.mark.integration

TEST_REDIS_URL = os.environ.get("AF_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")
PORTRAIT = Path(__file__).resolve().parents[2] / "samples" / "portrait.png"
APPS = ("audio_features", "motion_encoder", "decoder")
IDS = {"session_id": "sess-1", "tenant_id": "tenant-a"}


@pytest.fixture(scope="module")
def serve_app() -> Iterator[dict[str, Any]]:
    """A local Ray + Serve with the three deployments; yields the gRPC port and the Redis prefix."""
    try:
        pickle.loads(pickle.dumps(pb.ExtractFeaturesRequest()))
    except pickle.PicklingError as exc:
        pytest.fail(
            f"generated messages cannot be pickled ({exc}), so Serve cannot pass them between processes: "
            "their __module__ must be the import path services._generated.avatar_forcing.v1.*_pb2 "
            "(services/wire/codegen.py)"
        )
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {TEST_REDIS_URL}")

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from services.audio_features.deployment import AudioFeatures
    from services.decoder.deployment import FrameDecoder
    from services.motion_encoder.deployment import MotionEncoder

    prefix = f"test-grpc-{uuid.uuid4().hex[:12]}"
    overrides = {"redis_url": TEST_REDIS_URL, "redis_prefix": prefix, "model_preset": "tiny"}
    port = free_port()
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options=gRPCOptions(
                port=port,
                grpc_servicer_functions=[
                    servicer_function(s) for s in ("AudioFeatures", "MotionEncoder", "FrameDecoder")
                ],
            ),
        )
        for name, deployment in zip(APPS, (AudioFeatures, MotionEncoder, FrameDecoder), strict=True):
            serve.run(deployment.bind(overrides), name=name, route_prefix=f"/{name}")
        yield {"port": port, "prefix": prefix}
    finally:
        serve.shutdown()
        ray.shutdown()
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(scope="module")
def channel(serve_app) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{serve_app['port']}", options=grpc_options()) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


def app(name: str) -> tuple[tuple[str, str]]:
    return (("application", name),)


def extract_request(**fields: Any) -> pb.ExtractFeaturesRequest:
    wave = (0.3 * np.sin(np.arange(640 * 14) / 9.0)).astype(np.float32)  # 2 frames context, 10 out, 2 ahead
    request = pb.ExtractFeaturesRequest(
        **IDS, source=pb.USER, sample_rate=16000, first_frame=2, num_frames=10, left_context_samples=1280
    )
    request.samples.CopyFrom(encode(wave, "samples"))
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def expect_invalid(call: Any, request: Any, application: str, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=app(application), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(f"{field}:"), info.value.details()


def test_extract_matches_the_in_process_features(channel) -> None:
    from avatar_forcing.engine.streaming_audio import window_features
    from services.common.model_loader import load_model

    stub = pb_grpc.AudioFeaturesStub(channel)
    request = extract_request()
    response = stub.Extract(request, metadata=app("audio_features"), timeout=30)
    assert response.first_frame == 2
    features = decode(response.features, "features", shape=(10, Limit.MOTION_DIM))

    # The replica built the same seeded weights. (Bit-equality is the unit tests' business: here the
    # replica's torch runs with another thread count, which changes the float summation order.)
    model = load_model(Settings(model_preset="tiny"), device="cpu")
    wave = torch.from_numpy(decode(request.samples, "samples"))
    expected = window_features(model.audio_encoder, wave, 2, 10).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_portrait_user_motion_and_decode(channel) -> None:
    encoder = pb_grpc.MotionEncoderStub(channel)
    portrait = encoder.EncodePortrait(
        pb.EncodePortraitRequest(tenant_id="tenant-a", image=PORTRAIT.read_bytes()),
        metadata=app("motion_encoder"),
        timeout=30,
    )
    assert portrait.avatar_id.startswith("av_")
    assert decode(portrait.reference_motion, "reference_motion", shape=(512,)).any()

    crops = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    request = pb.EncodeUserMotionRequest(**IDS, crops=encode(crops, "crops"), first_frame=30)
    motion = encoder.EncodeUserMotion(request, metadata=app("motion_encoder"), timeout=30)
    assert motion.first_frame == 30
    assert decode(motion.latents, "latents", shape=(3, 512)).shape == (3, 512)

    decoder = pb_grpc.FrameDecoderStub(channel)
    latents = encode(0.1 * np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32), "latents")
    for image_format in (pb.JPEG, pb.RAW_RGB):
        request = pb.DecodeRequest(
            **IDS, avatar_id=portrait.avatar_id, latents=latents, first_frame=40, format=image_format
        )
        frames = decoder.Decode(request, metadata=app("decoder"), timeout=30).frames
        assert [f.frame_index for f in frames] == [40, 41, 42, 43]
        assert all((f.image.format, f.image.width, f.image.height) == (image_format, 64, 64) for f in frames)
    assert all(len(f.image.data) == 64 * 64 * 3 for f in frames)


def test_malformed_messages_are_invalid_argument_and_the_services_keep_answering(channel) -> None:
    features = pb_grpc.AudioFeaturesStub(channel)
    expect_invalid(features.Extract, extract_request(sample_rate=44100), "audio_features", "sample_rate")
    bad_tensor = extract_request()
    bad_tensor.samples.data = bad_tensor.samples.data[:-3]  # len(data) disagrees with the shape
    expect_invalid(features.Extract, bad_tensor, "audio_features", "samples.data")
    assert features.Extract(extract_request(), metadata=app("audio_features"), timeout=30).features.shape == [10, 512]

    encoder = pb_grpc.MotionEncoderStub(channel)
    bad_crops = pb.EncodeUserMotionRequest(**IDS, crops=encode(np.zeros((2, 64, 64), np.uint8), "crops"))
    expect_invalid(encoder.EncodeUserMotion, bad_crops, "motion_encoder", "crops.shape")
    not_an_image = pb.EncodePortraitRequest(tenant_id="tenant-a", image=b"\x89PNG\r\n\x1a\n garbage")
    expect_invalid(encoder.EncodePortrait, not_an_image, "motion_encoder", "image")
    good = pb.EncodeUserMotionRequest(**IDS, crops=encode(np.zeros((1, 64, 64, 3), np.uint8), "crops"))
    assert encoder.EncodeUserMotion(good, metadata=app("motion_encoder"), timeout=30).latents.shape == [1, 512]

    decoder = pb_grpc.FrameDecoderStub(channel)
    wrong_width = pb.DecodeRequest(**IDS, avatar_id="a1", latents=encode(np.zeros((2, 256), np.float32), "l"))
    expect_invalid(decoder.Decode, wrong_width, "decoder", "latents.shape")
    unknown = pb.DecodeRequest(**IDS, avatar_id="nobody", latents=encode(np.zeros((1, 512), np.float32), "l"))
    with pytest.raises(grpc.RpcError) as info:
        decoder.Decode(unknown, metadata=app("decoder"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and info.value.details().startswith("avatar_id:")


def test_handle_callers_get_typed_errors(serve_app) -> None:
    from ray import serve

    decoder = serve.get_app_handle("decoder")
    unknown = pb.DecodeRequest(**IDS, avatar_id="nobody", latents=encode(np.zeros((1, 512), np.float32), "l"))
    with pytest.raises(NotFoundError, match="avatar_id"):
        decoder.Decode.remote(unknown).result(timeout_s=30)


def test_handle_callers_get_validation_errors(serve_app) -> None:
    from ray import serve

    features = serve.get_app_handle("audio_features")
    with pytest.raises(ValidationError, match="sample_rate"):
        features.Extract.remote(extract_request(sample_rate=8000)).result(timeout_s=30)

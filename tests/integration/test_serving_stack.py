"""The whole stack: a real local Ray cluster, Serve's gRPC proxy, real Redis, real gRPC on loopback.

One Serve application (tiny model, two generator replicas) serves every test of this module.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import ray
import redis
import torch
from ray import serve
from ray.serve.config import gRPCOptions

from avatar_forcing.config import tiny
from avatar_forcing.nn.model import random_model
from services.common.auth import mint_token
from services.common.torch_tensors import decode_torch
from services.local.ray_start import init_local_ray
from services.serve_app import build_app
from services.wire.errors import SessionNotFoundError
from services.wire.protos import grpc_options, pb, pb_grpc, servicer_function
from services.wire.tensors import encode
from tests.integration.test_session_pipeline import FRAMES, client_messages, in_process
from tests.redis_support import free_port, start_redis, stop_redis

pytestmark = pytest.mark.integration
SECRET = "test-secret-" + "x" * 32
SERVICES = ("AudioFeatures", "MotionEncoder", "MotionGenerator", "FrameDecoder", "AvatarSession")
SAMPLES = Path(__file__).parents[2] / "samples"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    port = free_port()
    redis_dir = tmp_path_factory.mktemp("redis")
    redis_process = start_redis(port, redis_dir)  # with AOF: a restart keeps the sessions
    redis_url = f"redis://127.0.0.1:{port}/0"
    prefix = f"stack-{uuid.uuid4().hex[:8]}"
    env = {"AVATAR_FORCING_AUTH_SECRET": SECRET, "AF_REDIS_TIMEOUT_S": "1.0", "AF_REPLICA_TTL_S": "3"}
    os.environ.update(env)
    init_local_ray(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    grpc_port = free_port()
    serve.start(
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[servicer_function(s) for s in SERVICES]),
        http_options={"host": "127.0.0.1", "port": free_port()},
    )
    app = build_app(
        {"config": "tiny", "redis_url": redis_url, "redis_prefix": prefix, "degrade": False, "generator_replicas": 2}
    )
    serve.run(app, name="avatar_forcing", route_prefix="/")
    state = {
        "target": f"127.0.0.1:{grpc_port}",
        "redis_url": redis_url,
        "prefix": prefix,
        "port": port,
        "redis_dir": redis_dir,
        "redis": redis_process,
    }
    yield state
    serve.shutdown()
    ray.shutdown()
    stop_redis(state["redis"])


def auth(tenant: str = "acme") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(tenant, SECRET, 600)}"),)


def run(coro):
    return asyncio.run(coro)


async def generator_call(target, method, request, tenant="acme", timeout=60):
    async with grpc.aio.insecure_channel(target, options=grpc_options()) as channel:
        stub = pb_grpc.MotionGeneratorStub(channel)
        return await getattr(stub, method)(request, metadata=auth(tenant), timeout=timeout)


def features(frames: int, seed: int) -> dict[str, pb.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: encode(torch.randn(frames, 512, generator=g), name)
        for name in ("avatar_audio", "user_audio", "user_motion")
    }


def open_request(session_id: str, tenant="acme") -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(
        session_id=session_id,
        tenant_id=tenant,
        avatar_id="ava",
        options=pb.SessionOptions(warm_start=True, seed=1),
        reference_motion=encode(0.3 * torch.ones(512), "r"),
    )


def session_keys(stack) -> list[bytes]:
    client = redis.Redis.from_url(stack["redis_url"])
    try:
        return sorted(k for k in client.scan_iter(f"{stack['prefix']}:session*"))
    finally:
        client.close()


def test_stream_through_the_stack_equals_the_in_process_engine(stack):
    portrait = (SAMPLES / "portrait.png").read_bytes()
    from avatar_forcing.media.io import load_audio, read_video

    speech = (load_audio(SAMPLES / "avatar_speech.wav")[: FRAMES * 640] * 32767).astype(np.int16)
    clip = read_video(SAMPLES / "user.mp4")
    user = (clip.audio[: FRAMES * 640] * 32767).astype(np.int16)
    media = (portrait, speech, user, clip.frames[:FRAMES])

    async def stream():
        async def requests():
            for message in client_messages(*media):
                yield message

        async with grpc.aio.insecure_channel(stack["target"], options=grpc_options()) as channel:
            call = pb_grpc.AvatarSessionStub(channel).Stream(requests(), metadata=auth(), timeout=300)
            return [message async for message in call]

    out = run(stream())
    frames = [m.frame for m in out if m.WhichOneof("message") == "frame"]
    assert out[0].WhichOneof("message") == "started"
    assert [f.frame_index for f in frames] == list(range(FRAMES))
    images = np.stack([np.frombuffer(f.image.data, np.uint8).reshape(64, 64, 3) for f in frames])
    # The replicas run torch with one thread, so compare with the reference under the same setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected, _ = in_process(random_model(tiny(), seed=0), *media)
    finally:
        torch.set_num_threads(threads)
    difference = np.abs(images.astype(int) - expected.astype(int))
    assert difference.mean() < 0.05 and difference.max() <= 3, (difference.mean(), difference.max())
    assert b"".join(f.audio_pcm_s16le for f in frames) == speech.tobytes()


def test_pinning_holds_over_100_blocks_and_sessions_do_not_interfere(stack):
    async def session(sid: str, seed: int) -> tuple[set[str], torch.Tensor, list[int]]:
        await generator_call(stack["target"], "OpenSession", open_request(sid))
        replicas, latents, firsts = set(), [], []
        for block in range(100):
            request = pb.GenerateBlockRequest(
                session_id=sid, tenant_id="acme", first_frame=block * 10, **features(10, seed * 1000 + block)
            )
            response = await generator_call(stack["target"], "GenerateBlock", request)
            replicas.add(response.replica_id)
            firsts.append(response.first_frame)
            latents.append(decode_torch(response.latents, "latents"))
        await generator_call(stack["target"], "CloseSession", pb.CloseSessionRequest(session_id=sid, tenant_id="acme"))
        return replicas, torch.cat(latents), firsts

    async def both():
        return await asyncio.gather(session("pin-a", 1), session("pin-b", 2))

    (replicas_a, a, firsts_a), (replicas_b, b, _) = run(both())
    assert len(replicas_a) == 1 and len(replicas_b) == 1  # every block on the session's replica
    assert firsts_a == [i * 10 for i in range(100)] and a.shape == (1000, 512) and torch.isfinite(a).all()
    assert not torch.allclose(a, b)
    assert session_keys(stack) == []


def kill_replica(replica_id: str) -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if replica_id in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no actor for replica {replica_id}")


def test_a_killed_generator_replica_is_resumed_elsewhere_with_continuous_frames(stack):
    sid = "resume-1"

    async def main():
        await generator_call(stack["target"], "OpenSession", open_request(sid))
        durations, owners, firsts = [], [], []
        for block in range(12):
            if block == 6:
                kill_replica(owners[-1])
            request = pb.GenerateBlockRequest(
                session_id=sid, tenant_id="acme", first_frame=block * 10, **features(10, block)
            )
            start = time.perf_counter()
            response = await generator_call(stack["target"], "GenerateBlock", request)
            durations.append(time.perf_counter() - start)
            owners.append(response.replica_id)
            firsts.append((response.first_frame, response.resumed))
        await generator_call(stack["target"], "CloseSession", pb.CloseSessionRequest(session_id=sid, tenant_id="acme"))
        return durations, owners, firsts

    durations, owners, firsts = run(main())
    assert len(set(owners[:6])) == 1 and owners[6] != owners[5] and len(set(owners[6:])) == 1
    assert [f for f, _ in firsts] == [i * 10 for i in range(12)]  # no frame number lost
    assert firsts[6][1] and not any(r for _, r in firsts[7:])
    normal = float(np.median(durations[1:6]))
    print(
        f"\nresume: normal block call {normal * 1e3:.0f} ms, resumed call {durations[6] * 1e3:.0f} ms "
        f"(added {1e3 * (durations[6] - normal):.0f} ms, including Serve noticing the dead replica)"
    )


def test_redis_restart_fails_clearly_then_sessions_continue(stack):
    sid = "redis-restart"

    async def block(n):
        request = pb.GenerateBlockRequest(session_id=sid, tenant_id="acme", first_frame=n * 10, **features(10, n))
        return await generator_call(stack["target"], "GenerateBlock", request, timeout=30)

    async def main():
        await generator_call(stack["target"], "OpenSession", open_request(sid))
        await block(0)
        stop_redis(stack["redis"])
        start = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await block(1)
        elapsed = time.perf_counter() - start
        stack["redis"] = start_redis(stack["port"], stack["redis_dir"])  # AOF: the data comes back
        after = None
        for _ in range(20):  # the block that failed is sent again
            try:
                after = await block(1)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
        await generator_call(stack["target"], "CloseSession", pb.CloseSessionRequest(session_id=sid, tenant_id="acme"))
        return down.value, elapsed, after

    error, elapsed, after = run(main())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "redis" in error.details().lower()
    assert elapsed < 20  # a clear status, no hang
    assert after is not None and after.first_frame == 10


def test_bad_requests_get_clear_status_codes_and_the_service_stays_up(stack):
    target = stack["target"]

    async def status(method, request, tenant="acme", metadata=None):
        async with grpc.aio.insecure_channel(target, options=grpc_options()) as channel:
            stub = pb_grpc.MotionGeneratorStub(channel)
            try:
                await getattr(stub, method)(request, metadata=metadata or auth(tenant), timeout=60)
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details()
            return grpc.StatusCode.OK, ""

    async def main():
        unknown = await status(
            "GenerateBlock", pb.GenerateBlockRequest(session_id="nope", tenant_id="acme", **features(10, 0))
        )
        await generator_call(target, "OpenSession", open_request("bad-1"))
        wrong_shape = pb.GenerateBlockRequest(session_id="bad-1", tenant_id="acme", first_frame=0, **features(10, 0))
        wrong_shape.user_motion.CopyFrom(encode(torch.zeros(10, 256), "user_motion"))
        shape = await status("GenerateBlock", wrong_shape)
        truncated = pb.GenerateBlockRequest(session_id="bad-1", tenant_id="acme", **features(10, 0))
        truncated.avatar_audio.data = truncated.avatar_audio.data[:100]
        malformed = await status("GenerateBlock", truncated)
        other_tenant = await status(
            "GenerateBlock", pb.GenerateBlockRequest(session_id="bad-1", tenant_id="acme"), tenant="evil"
        )
        no_token = await status("OpenSession", open_request("bad-2"), metadata=(("x", "y"),))
        ok = await status(
            "GenerateBlock",
            pb.GenerateBlockRequest(session_id="bad-1", tenant_id="acme", first_frame=0, **features(10, 0)),
        )
        await generator_call(target, "CloseSession", pb.CloseSessionRequest(session_id="bad-1", tenant_id="acme"))
        return unknown, shape, malformed, other_tenant, no_token, ok

    unknown, shape, malformed, other_tenant, no_token, ok = run(main())
    assert unknown[0] == grpc.StatusCode.NOT_FOUND
    assert shape[0] == grpc.StatusCode.INVALID_ARGUMENT and "user_motion.shape" in shape[1]
    assert malformed[0] == grpc.StatusCode.INVALID_ARGUMENT and "avatar_audio" in malformed[1]
    assert other_tenant[0] == grpc.StatusCode.NOT_FOUND  # never PERMISSION_DENIED: ids do not leak
    assert other_tenant[1] == str(SessionNotFoundError("bad-1"))
    assert no_token[0] == grpc.StatusCode.UNAUTHENTICATED
    assert ok[0] == grpc.StatusCode.OK  # the service is still up and the session still works


async def rpc_status(target, service: str, method: str, request, token: str):
    """(code, details) of one unary call through the proxy."""
    async with grpc.aio.insecure_channel(target, options=grpc_options()) as channel:
        stub = getattr(pb_grpc, f"{service}Stub")(channel)
        try:
            await getattr(stub, method)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=60)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()
        return grpc.StatusCode.OK, ""


async def stream_status(target, start: pb.Start, token: str):
    """(code, details) of a Stream that sends only Start (and ends its input)."""

    async def requests():
        yield pb.ClientMessage(start=start)
        yield pb.ClientMessage(end_of_input=pb.EndOfInput())

    async with grpc.aio.insecure_channel(target, options=grpc_options()) as channel:
        call = pb_grpc.AvatarSessionStub(channel).Stream(
            requests(), metadata=(("authorization", f"Bearer {token}"),), timeout=60
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()
        return grpc.StatusCode.OK, ""


def test_every_rpc_answers_another_tenants_session_or_avatar_as_unknown(stack):
    """Cross-tenant attempts on every public RPC: NOT_FOUND with exactly the message of an unknown id."""
    target, portrait = stack["target"], (SAMPLES / "portrait.png").read_bytes()
    acme, evil = mint_token("acme", SECRET, 600), mint_token("evil", SECRET, 600)
    wave = np.zeros(640 * 10, np.int16).tobytes()
    crops = encode(np.zeros((1, 64, 64, 3), np.uint8), "crops")
    latents = encode(np.zeros((1, 512), np.float32), "latents")

    def session_calls(sid: str, tenant: str):
        ids = {"session_id": sid, "tenant_id": tenant}
        return [
            (
                "AudioFeatures",
                "Extract",
                pb.ExtractFeaturesRequest(**ids, source=pb.AVATAR, sample_rate=16000, num_frames=10, pcm_s16le=wave),
            ),
            ("MotionEncoder", "EncodeUserMotion", pb.EncodeUserMotionRequest(**ids, crops=crops)),
            (
                "MotionGenerator",
                "OpenSession",
                pb.OpenSessionRequest(**ids, avatar_id="ava", reference_motion=encode(np.zeros(512, np.float32), "r")),
            ),
            ("MotionGenerator", "GenerateBlock", pb.GenerateBlockRequest(**ids, first_frame=0, **features(10, 0))),
            ("MotionGenerator", "CloseSession", pb.CloseSessionRequest(**ids)),
            ("FrameDecoder", "Decode", pb.DecodeRequest(**ids, avatar_id="iso-ava", latents=latents)),
        ]

    async def main():
        await generator_call(target, "OpenSession", open_request("iso-a"))
        assert (
            await rpc_status(
                target,
                "MotionEncoder",
                "EncodePortrait",
                pb.EncodePortraitRequest(tenant_id="acme", avatar_id="iso-ava", image=portrait),
                acme,
            )
        )[0] == grpc.StatusCode.OK
        await generator_call(target, "OpenSession", open_request("iso-e", tenant="evil"), tenant="evil")
        answers = {}
        # The evil token names acme's session, under either tenant id: as an unknown session.
        for tenant in ("evil", "acme"):
            for service, method, request in session_calls("iso-a", tenant):
                answers[(method, tenant)] = await rpc_status(target, service, method, request, evil)
        answers["Decode avatar"] = await rpc_status(
            target,
            "FrameDecoder",
            "Decode",
            pb.DecodeRequest(session_id="iso-e", tenant_id="evil", avatar_id="iso-ava", latents=latents),
            evil,
        )
        answers["Decode no avatar"] = await rpc_status(
            target,
            "FrameDecoder",
            "Decode",
            pb.DecodeRequest(session_id="iso-e", tenant_id="evil", avatar_id="nope", latents=latents),
            evil,
        )
        answers["EncodePortrait"] = await rpc_status(
            target,
            "MotionEncoder",
            "EncodePortrait",
            pb.EncodePortraitRequest(tenant_id="acme", avatar_id="iso-ava", image=portrait),
            evil,
        )
        answers["EncodePortrait no tenant"] = await rpc_status(
            target,
            "MotionEncoder",
            "EncodePortrait",
            pb.EncodePortraitRequest(tenant_id="no-such-tenant", avatar_id="iso-ava", image=portrait),
            evil,
        )
        answers["unknown"] = await rpc_status(target, *session_calls("iso-unknown", "evil")[3], evil)
        start = pb.Start(session_id="iso-a", output_format=pb.RAW_RGB, portrait=portrait)
        answers["Stream"] = await stream_status(target, start, evil)
        answers["Stream unknown"] = await stream_status(
            target, pb.Start(session_id="iso-unknown", portrait=portrait), evil
        )
        answers["Stream avatar"] = await stream_status(target, pb.Start(avatar_id="iso-ava"), evil)
        answers["Stream no avatar"] = await stream_status(target, pb.Start(avatar_id="nope"), evil)
        # Nothing of acme's was touched: its session still generates.
        answers["acme"] = await rpc_status(target, *session_calls("iso-a", "acme")[3], acme)
        for sid, tenant in (("iso-a", "acme"), ("iso-e", "evil")):
            await generator_call(
                target, "CloseSession", pb.CloseSessionRequest(session_id=sid, tenant_id=tenant), tenant=tenant
            )
        return answers

    answers = run(main())
    unknown_session = str(SessionNotFoundError("iso-a"))
    assert answers["unknown"] == (grpc.StatusCode.NOT_FOUND, str(SessionNotFoundError("iso-unknown")))
    for method in ("Extract", "EncodeUserMotion", "OpenSession", "GenerateBlock", "CloseSession", "Decode"):
        for tenant in ("evil", "acme"):
            assert answers[(method, tenant)] == (grpc.StatusCode.NOT_FOUND, unknown_session), (method, tenant)
    code, details = answers["Decode avatar"]
    assert code == grpc.StatusCode.NOT_FOUND and details == answers["Decode no avatar"][1].replace("nope", "iso-ava")
    assert answers["EncodePortrait"][0] == grpc.StatusCode.NOT_FOUND
    assert answers["EncodePortrait"][1] == answers["EncodePortrait no tenant"][1].replace("no-such-tenant", "acme")
    assert answers["Stream"] == (grpc.StatusCode.NOT_FOUND, unknown_session)
    assert answers["Stream unknown"] == (grpc.StatusCode.NOT_FOUND, str(SessionNotFoundError("iso-unknown")))
    code, details = answers["Stream avatar"]
    assert code == grpc.StatusCode.NOT_FOUND and details == answers["Stream no avatar"][1].replace("nope", "iso-ava")
    assert answers["acme"][0] == grpc.StatusCode.OK


def test_a_session_token_reaches_only_its_session(stack):
    target = stack["target"]
    portrait = (SAMPLES / "portrait.png").read_bytes()
    token_a = mint_token("acme", SECRET, 600, session_id="tok-a")

    async def main():
        for sid in ("tok-a", "tok-b"):
            await generator_call(target, "OpenSession", open_request(sid))
        answers = {
            "other": await stream_status(target, pb.Start(session_id="tok-b", portrait=portrait), token_a),
            "empty": await stream_status(target, pb.Start(portrait=portrait), token_a),
            "generate other": await rpc_status(
                target,
                "MotionGenerator",
                "GenerateBlock",
                pb.GenerateBlockRequest(session_id="tok-b", tenant_id="acme", first_frame=0, **features(10, 0)),
                token_a,
            ),
            "generate own": await rpc_status(
                target,
                "MotionGenerator",
                "GenerateBlock",
                pb.GenerateBlockRequest(session_id="tok-a", tenant_id="acme", first_frame=0, **features(10, 0)),
                token_a,
            ),
        }
        for sid in ("tok-a", "tok-b"):
            await generator_call(target, "CloseSession", pb.CloseSessionRequest(session_id=sid, tenant_id="acme"))
        return answers

    answers = run(main())
    assert answers["other"] == (grpc.StatusCode.NOT_FOUND, str(SessionNotFoundError("tok-b")))
    assert answers["empty"][0] == grpc.StatusCode.INVALID_ARGUMENT and answers["empty"][1].startswith(
        "start.session_id:"
    )
    assert answers["generate other"] == (grpc.StatusCode.NOT_FOUND, str(SessionNotFoundError("tok-b")))
    assert answers["generate own"][0] == grpc.StatusCode.OK
    assert session_keys(stack) == []

"""The LiveKit room bridge: plays one avatar session per room, many sessions per process.

    protocol      the lk.* names and payloads of livekit-agents' avatar protocol
    room          the room interface the bridge needs (`Room`), and the participant types
    memory_room   an in-memory room: participants, byte streams, RPC, media (tests, benchmark)
    livekit_room  the `Room` over a real `livekit.rtc.Room`
    audio_in      the agent's speech segments (byte streams) and the human's microphone -> 16 kHz
    video_out     the avatar's frames published at exactly 25 fps, each with its own audio
    runner        `BridgeSession`: room <-> session stream, playback events, lifecycle
    backend       the session side: `GrpcBackend` (services.client) and `FakeBackend` (in process)
    worker        the dispatch consumer (Redis P:bridge:dispatch) holding many sessions
    __main__      `python -m services.bridge`

docs/bridge.md has the contract and the behaviour.
"""

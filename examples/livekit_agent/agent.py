"""A minimal LiveKit voice agent with an Avatar Forcing avatar (see README.md in this folder).

    python examples/livekit_agent/agent.py dev        # LIVEKIT_URL/_API_KEY/_API_SECRET, AVATAR_FORCING_*

The STT/LLM/TTS strings are LiveKit Inference model names (LiveKit Cloud); with a self-hosted
server, pass plugin instances instead (e.g. livekit-plugins-openai / -deepgram / -cartesia).
"""

import os

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli
from livekit.plugins import avatar_forcing

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(stt="deepgram/nova-3", llm="openai/gpt-4.1-mini", tts="cartesia/sonic-2")

    # The avatar: five lines. Start it before session.start(): the session then sends its speech
    # to the avatar (which publishes video + audio on the agent's behalf) instead of publishing it.
    avatar = avatar_forcing.AvatarSession(
        avatar_id=os.environ.get("AVATAR_ID", "ava"),  # gateway from $AVATAR_FORCING_API_URL, key $..._API_KEY
    )
    await avatar.start(session, room=ctx.room)

    await session.start(agent=Agent(instructions="You are a friendly assistant. Keep answers short."), room=ctx.room)
    await session.generate_reply(instructions="Greet the user.")


if __name__ == "__main__":
    cli.run_app(server)

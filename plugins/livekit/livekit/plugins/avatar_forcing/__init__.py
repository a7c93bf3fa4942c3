"""Avatar Forcing avatars for LiveKit Agents: `AvatarSession(avatar_id=...)` (the gateway from
$AVATAR_FORCING_API_URL, the key from $AVATAR_FORCING_API_KEY), then `await avatar.start(session,
room=ctx.room)` before `session.start(...)`. See the package's README."""

from livekit.agents import Plugin

from .avatar import DEFAULT_API_KEY_ENV, DEFAULT_API_URL_ENV, SAMPLE_RATE, AvatarSession
from .errors import AvatarForcingError, AvatarForcingQuotaError
from .log import logger
from .version import __version__

__all__ = [
    "DEFAULT_API_KEY_ENV",
    "DEFAULT_API_URL_ENV",
    "SAMPLE_RATE",
    "AvatarForcingError",
    "AvatarForcingQuotaError",
    "AvatarSession",
    "__version__",
]


class AvatarForcingPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(AvatarForcingPlugin())

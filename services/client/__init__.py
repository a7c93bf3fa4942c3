"""Python client of the service: `AvatarClient` (AvatarSession.Stream over grpc.aio) and the
`avatar-forcing client` command (`services.client.cli`).

    from services.client import AvatarClient
"""

from services.client.frames import Frame, FrameTiming
from services.client.session import AvatarClient
from services.client.stream import AvatarStream, ServerWarning
from services.wire.errors import (
    AnswerTimeoutError,
    CapacityExceededError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    ServerError,
    ServerMessageError,
    ServiceError,
    SessionClosedError,
    UnauthenticatedError,
    UnavailableError,
    ValidationError,
)

__all__ = [
    "AnswerTimeoutError",
    "AvatarClient",
    "AvatarStream",
    "CapacityExceededError",
    "Frame",
    "FrameTiming",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "ServerError",
    "ServerMessageError",
    "ServerWarning",
    "ServiceError",
    "SessionClosedError",
    "UnauthenticatedError",
    "UnavailableError",
    "ValidationError",
]

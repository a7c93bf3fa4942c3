"""Python client of the service: `AvatarClient` (AvatarSession.Stream over grpc.aio) and the
`avatar-forcing client` command (`services.client.cli`).

    from services.client import AvatarClient
"""

from services.client.session import (
    AnswerTimeoutError,
    AvatarClient,
    AvatarStream,
    Frame,
    FrameTiming,
    ProtocolError,
    ServerError,
    ServerMessageError,
    ServerWarning,
    SessionClosedError,
)
from services.wire.errors import (
    CapacityExceededError,
    NotFoundError,
    PermissionDeniedError,
    ServiceError,
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

"""Service errors and their gRPC status codes, in one place.

Every error a service raises on purpose is a `ServiceError` subclass that carries its gRPC
status code; messages name the field, the value and what was expected. Handlers map errors
to statuses with `grpc_errors` (grpc.aio servicers) or `services.common.servicer_call.call_servicer` (Ray Serve gRPC
deployments, whose context has no `abort`); clients map a failed call back with `from_rpc_error`.

    ValidationError          INVALID_ARGUMENT     bad input (also: a plain ValueError from avatar_forcing)
    UnauthenticatedError     UNAUTHENTICATED      missing or bad credentials
    NotFoundError            NOT_FOUND            unknown session (SessionNotFoundError), avatar (AvatarNotFoundError),
                                                  and *another tenant's* session or avatar (TenantMismatchError):
                                                  answered exactly as an unknown id, so ids do not leak
    PermissionDeniedError    PERMISSION_DENIED    a valid token whose scope does not allow the operation
    CapacityExceededError    RESOURCE_EXHAUSTED   replica or tenant limit reached, rate or buffer limit
                                                  (QuotaExceededError: a tenant quota or key rate, by name)
    UnavailableError         UNAVAILABLE          a backend is down (StoreUnavailable: Redis); retry later
    ConflictError            ABORTED              lost a race (OwnershipConflictError, OwnershipLostError)
    FailedPreconditionError  FAILED_PRECONDITION  the state does not allow it (FrameConflictError, ...)

Raised by the client (`services.client`) about the stream itself:

    ServerMessageError       the Error's code     a non-fatal `Error` message (`ServerError`), on_error="raise"
    ProtocolError            INTERNAL             the server broke the contract (no Started first, a bad frame)
    AnswerTimeoutError       DEADLINE_EXCEEDED    no Started (or Interrupted) in time
    SessionClosedError       FAILED_PRECONDITION  a send after end_input() or after the call ended

Unexpected exceptions become INTERNAL with a generic message (the traceback goes to the log,
not to the client: request contents and secrets never leave the server in an error).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

log = logging.getLogger(__name__)

MAX_DETAILS_CHARS = 1000  # status details travel in trailers (8 KiB metadata limit)


class ServiceError(Exception):
    """An error with a gRPC status code. Subclasses set `code`."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __reduce__(self):
        # Subclasses take other constructor arguments; rebuild from the message and attributes
        # so that the error crosses process boundaries (Ray) with its type and text intact.
        return (_rebuild, (type(self), str(self), dict(self.__dict__)))


def _rebuild(cls: type[ServiceError], message: str, attributes: dict) -> ServiceError:
    error = Exception.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(attributes)
    return error


class ValidationError(ServiceError, ValueError):
    """Bad input. `field` names the offending field (dotted path, e.g. "avatar_audio.shape")."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnauthenticatedError(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFoundError(ServiceError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


def not_found_message(what: str, ident: str, tenant_id: str) -> str:
    """The one message for an id the caller's tenant does not have: unknown, or another tenant's.

    Both cases answer the same text (NOT_FOUND), so a tenant cannot learn that another tenant's id exists.
    """
    if what.endswith("session_id"):
        return f"{what}: no session {ident!r} (never created, closed, or reaped)"
    if what.endswith("avatar_id"):
        return f"{what}: tenant {tenant_id!r} has no avatar {ident!r}; upload its portrait"
    return f"{what}: tenant {tenant_id!r} has no {ident!r}"


class SessionNotFoundError(NotFoundError):
    def __init__(self, session_id: str) -> None:
        super().__init__(not_found_message("session_id", session_id, ""))
        self.session_id = session_id


class AvatarNotFoundError(NotFoundError):
    def __init__(self, tenant_id: str, avatar_id: str, field: str = "avatar_id") -> None:
        super().__init__(not_found_message(field, avatar_id, tenant_id))
        self.tenant_id = tenant_id
        self.avatar_id = avatar_id


class PermissionDeniedError(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class TenantMismatchError(NotFoundError):
    """Another tenant's session or avatar: NOT_FOUND with the message of an unknown id (never 403: no leak)."""

    def __init__(self, what: str, ident: str, tenant_id: str) -> None:
        super().__init__(not_found_message(what, ident, tenant_id))


class CapacityExceededError(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QuotaExceededError(CapacityExceededError):
    """A tenant's quota or a key's rate limit is reached. `limit` names it (e.g. "max_concurrent_sessions");
    `retry_after_s` says when trying again can succeed (None: not until usage drops)."""

    def __init__(self, limit: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"quota {limit}: {message}")
        self.limit = limit
        self.retry_after_s = retry_after_s


class UnavailableError(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class StoreUnavailable(UnavailableError):  # noqa: N818 - the name the services were promised
    """The Redis session store cannot be reached (or did not answer in time)."""


class ConflictError(ServiceError):
    code = grpc.StatusCode.ABORTED


class OwnershipConflictError(ConflictError):
    """Another live replica owns the session."""


class OwnershipLostError(ConflictError):
    """This replica no longer owns the session (another claimed it): stop writing, drop the cache."""


class FailedPreconditionError(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class FrameConflictError(FailedPreconditionError):
    """A block's first frame is not the session's frame cursor."""


# -- the stream, as the client sees it ---------------------------------------------------------


@dataclass(frozen=True)
class ServerError:
    """A non-fatal `Error` message (session.proto): the server dropped one client message; the session goes on."""

    code: int  # a gRPC status code number (3 INVALID_ARGUMENT, 8 RESOURCE_EXHAUSTED, ...)
    message: str  # the server's text: the field, the value and what was expected

    @property
    def status(self) -> grpc.StatusCode | None:
        return next((c for c in grpc.StatusCode if c.value[0] == self.code), None)

    def __str__(self) -> str:
        name = self.status.name if self.status is not None else f"code {self.code}"
        return f"{name}: {self.message}"


class ServerMessageError(ServiceError):
    """A non-fatal `Error` message raised (on_error="raise"), with the Error's own status code."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(str(error))
        self.error = error
        self.code = error.status or grpc.StatusCode.UNKNOWN


class ProtocolError(ServiceError):
    """The server broke the contract (no Started first, an undecodable frame, ...)."""

    code = grpc.StatusCode.INTERNAL


class AnswerTimeoutError(ServiceError):
    """The server did not answer Start (or Interrupt) in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class SessionClosedError(FailedPreconditionError):
    """A send after `end_input()`, or after the call ended."""


_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details for an exception."""
    if isinstance(exc, ServiceError):
        code, message = exc.code, str(exc)
    elif isinstance(exc, ValueError):  # avatar_forcing validates its inputs with ValueError
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    elif isinstance(exc, TimeoutError):
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "the operation timed out"
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
    if len(message) > MAX_DETAILS_CHARS:
        message = message[: MAX_DETAILS_CHARS - 3] + "..."
    return code, message


def status_number(code: grpc.StatusCode) -> int:
    """The numeric value of a status code (for `Error.code` in session.proto)."""
    return int(code.value[0])


def error_fields(exc: BaseException) -> tuple[int, str]:
    """(code number, message) of an exception, for a non-fatal `pb.Error` on a stream."""
    code, message = status_of(exc)
    return status_number(code), message


def _log(exc: BaseException, where: str) -> None:
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s: unexpected %s", where, type(exc).__name__, exc_info=exc)
    else:
        log.info("%s: %s %s", where, code.name, message)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End a grpc.aio call with the status of `exc`."""
    code, message = status_of(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def _find_context(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    for value in (*kwargs.values(), *reversed(args)):
        if hasattr(value, "set_code") and hasattr(value, "set_details"):
            return value
    raise TypeError("grpc_errors: the handler has no ServicerContext argument")


def grpc_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a grpc.aio servicer method (unary or streaming): errors become gRPC statuses.

    A `context.abort(...)` the handler makes itself passes through unchanged.
    """
    where = handler.__qualname__

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream_wrapper(*args: Any, **kwargs: Any) -> Any:
            context = _find_context(args, kwargs)
            try:
                async for item in handler(*args, **kwargs):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                _log(exc, where)
                await abort(context, exc)

        return stream_wrapper

    @functools.wraps(handler)
    async def unary_wrapper(*args: Any, **kwargs: Any) -> Any:
        context = _find_context(args, kwargs)
        try:
            return await handler(*args, **kwargs)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            _log(exc, where)
            await abort(context, exc)

    return unary_wrapper


def set_status(context: Any, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Set code and details on a context without `abort` (Ray Serve's RayServegRPCContext)."""
    code, message = status_of(exc)
    context.set_code(code)
    context.set_details(message)
    return code, message


def from_rpc_error(error: grpc.RpcError) -> ServiceError:
    """The ServiceError for a failed call (client side), keeping the server's message."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, message = details.partition(": ")
        return ValidationError(field, message) if message else ValidationError("request", details)
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(details)
    result = ServiceError(details)
    result.code = code
    return result

"""Whole-message limits of the contract that a servicer checks itself.

Serve's gRPC proxy accepts messages up to 2 GiB whatever the channel options say, so a service
behind it checks MAX_MESSAGE_BYTES on the request before doing any work.
"""

from __future__ import annotations

from google.protobuf.message import Message

from services.wire.errors import ValidationError
from services.wire.protos import Limit

__all__ = ["check_message_size"]


def check_message_size(request: Message, field: str = "request") -> None:
    """The serialised `request` within MAX_MESSAGE_BYTES."""
    size = request.ByteSize()
    if size > Limit.MAX_MESSAGE_BYTES:
        raise ValidationError(field, f"{size} bytes exceeds MAX_MESSAGE_BYTES = {Limit.MAX_MESSAGE_BYTES}")

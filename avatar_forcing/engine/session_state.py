"""The one serialised form of session state.

Everything of a session that leaves a process — the whole stream (`MotionStream.to_bytes`),
one block of resume history (`HistoryBlock`), the constant setup a replica needs to rebuild a
stream (`SessionSetup`) — is a safetensors blob whose metadata says what it is:

    {"format": "avatar-forcing.session-state", "version": "1", "kind": <kind>, "meta": <JSON>}

safetensors because it is a plain, safe container (no pickle) that any language reads; one
header layout so that a blob of one kind handed to another reader fails with a clear error,
and the version is checked in one place. The header is JSON before the tensor bytes, so
`read_meta` answers without loading tensors (or torch).
"""

from __future__ import annotations

import json
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

FORMAT = "avatar-forcing.session-state"
VERSION = 1
KINDS = ("stream", "history-block", "setup")


def pack(kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> bytes:
    """Tensors + JSON-able metadata -> one blob of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"session state: kind {kind!r}; expected one of {KINDS}")
    header = {"format": FORMAT, "version": str(VERSION), "kind": kind, "meta": json.dumps(meta)}
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, header)


def read_header(data: bytes) -> dict[str, str]:
    """The blob's string metadata, read from the JSON header without loading any tensor."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < 8:
        raise ValueError("session state: not a safetensors blob (shorter than its 8-byte header length)")
    header_len = int.from_bytes(bytes(data[:8]), "little")
    if header_len > len(data) - 8:
        raise ValueError(f"session state: header of {header_len} bytes exceeds the blob of {len(data)} bytes")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except ValueError as exc:
        raise ValueError(f"session state: header is not JSON ({exc})") from None
    return header.get("__metadata__", {}) if isinstance(header, dict) else {}


def read_meta(data: bytes, kind: str) -> dict[str, Any]:
    """The metadata of a blob that must be of `kind` (format, version and kind checked)."""
    header = read_header(data)
    if header.get("format") != FORMAT:
        raise ValueError(f"session state: format {header.get('format')!r}; expected {FORMAT!r}")
    if header.get("version") != str(VERSION):
        raise ValueError(f"session state: version {header.get('version')} unsupported; expected {VERSION}")
    if header.get("kind") != kind:
        raise ValueError(f"session state: a {header.get('kind')!r} blob; expected a {kind!r} blob")
    return json.loads(header["meta"])


def unpack(data: bytes, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A blob of `kind` -> (tensors, metadata); ValueError saying what is wrong otherwise."""
    meta = read_meta(data, kind)
    try:
        tensors = load_safetensors(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"session state: the {kind} blob's tensors do not load ({exc})") from None
    return tensors, meta

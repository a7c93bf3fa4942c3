"""The conversation manifest: one JSON object per line, one dyadic conversation per object.

    {"id": "ep01-s03", "avatar_video": "ep01/host.mp4", "user_video": "ep01/guest.mp4",
     "avatar_audio": "ep01/host.wav", "user_audio": "ep01/guest.wav"}

- `id`: unique in the manifest; names the conversation in shards, the ledger and errors.
- `avatar_video` / `user_video`: each side's face video (any frame rate; read at 25 fps).
- `avatar_audio` / `user_audio`: each side's **separated** voice (any audio or video file PyAV
  decodes; read as 16 kHz mono). Separating a mixed recording into speakers is the caller's job
  (the paper uses a visually grounded separation model); a mixed track given for both sides
  teaches the model nothing about who speaks. A side's video file may serve as its audio
  file when its own track already holds only that side's voice.

Relative paths are resolved against the manifest's folder. Blank lines and lines starting
with `#` are skipped. Every problem is reported with the manifest's name, the line number and
the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MEDIA_FIELDS = ("avatar_video", "user_video", "avatar_audio", "user_audio")


class ManifestError(ValueError):
    """A malformed manifest line; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Conversation:
    """One manifest entry with absolute media paths."""

    id: str
    avatar_video: Path
    user_video: Path
    avatar_audio: Path
    user_audio: Path
    line: int  # 1-based line number in the manifest (for messages)

    def media(self) -> dict[str, Path]:
        return {name: getattr(self, name) for name in MEDIA_FIELDS}


def parse_line(text: str, line: int, base: Path, source: str) -> Conversation:
    """One JSON line -> Conversation; ManifestError naming `source`, the line and the field."""
    where = f"{source}:{line}"
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    conv_id = entry.get("id")
    if not isinstance(conv_id, str) or not conv_id.strip():
        raise ManifestError(f"{where}: field 'id': expected a non-empty string, got {conv_id!r}")
    unknown = sorted(set(entry) - {"id", *MEDIA_FIELDS})
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {unknown}; expected 'id' and {list(MEDIA_FIELDS)}")
    paths = {}
    for name in MEDIA_FIELDS:
        value = entry.get(name)
        if not isinstance(value, str) or not value:
            raise ManifestError(f"{where}: field {name!r}: expected a file path string, got {value!r}")
        path = Path(value).expanduser()
        paths[name] = path if path.is_absolute() else base / path
    return Conversation(id=conv_id, line=line, **paths)


def read_manifest(path: str | Path) -> list[Conversation]:
    """Parse and validate the whole manifest (ids unique). Media files are not opened here:
    a missing or unreadable file is a per-conversation error reported while preparing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path}: no such file")
    conversations: list[Conversation] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        conv = parse_line(text, number, path.parent, str(path))
        if conv.id in seen:
            raise ManifestError(f"{path}:{number}: field 'id': {conv.id!r} already used on line {seen[conv.id]}")
        seen[conv.id] = number
        conversations.append(conv)
    if not conversations:
        raise ManifestError(f"{path}: no conversations; expected one JSON object per line")
    return conversations


def write_manifest(path: str | Path, entries: list[dict[str, str]]) -> None:
    """Write manifest entries (dicts of the fields above) one JSON object per line."""
    Path(path).write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")

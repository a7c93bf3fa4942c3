"""The prepared-data format on disk: shards, the ledger, the index.

    OUT/
      settings.json          how the data was made (model, crop, clip rules); resume checks it
      ledger.jsonl           one line per finished conversation (done or failed); last line wins
      index.json             every clip: shard file, key, conversation, frames; totals
      shards/<name>.safetensors   one per conversation with at least one clip

A shard is a safetensors file (lazy, per-array reads) holding, for each clip `k` (0, 1, ...):

    k/avatar_motion     (T, D) float32   motion latents of the avatar's face crops
    k/user_motion       (T, D) float32   motion latents of the user's face crops
    k/avatar_audio      (T, A) float32   audio features of the avatar's voice, one per frame
    k/user_audio        (T, A) float32   audio features of the user's voice
    k/identity          (D,)   float32   s_r of the clip's reference avatar frame
    k/reference_motion  (D,)   float32   r_s of that frame (the generator's reference input)

and, in its metadata, the conversation id and per-clip JSON (start frame in the conversation
at 25 fps, frame count, reference frame). T frames at 25 fps; D = motion width (512 for the
paper model), A = audio feature width (512).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT = "avatar-forcing-shards"
VERSION = 1
SETTINGS_FILE = "settings.json"
LEDGER_FILE = "ledger.jsonl"
INDEX_FILE = "index.json"
SHARD_DIR = "shards"
SEQUENCE_ARRAYS = ("avatar_motion", "user_motion", "avatar_audio", "user_audio")  # (T, ·)
CLIP_ARRAYS = (*SEQUENCE_ARRAYS, "identity", "reference_motion")


@dataclass
class Clip:
    """One clip's arrays and where it came from."""

    avatar_motion: np.ndarray  # (T, D)
    user_motion: np.ndarray  # (T, D)
    avatar_audio: np.ndarray  # (T, A)
    user_audio: np.ndarray  # (T, A)
    identity: np.ndarray  # (D,)
    reference_motion: np.ndarray  # (D,)
    conversation: str
    start_frame: int  # first frame in the conversation (25 fps)
    reference_frame: int  # conversation frame whose avatar crop gave identity / reference_motion

    @property
    def num_frames(self) -> int:
        return self.avatar_motion.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in CLIP_ARRAYS}

    def validate(self) -> None:
        """Shapes agree: every sequence has T frames, latents share D. ValueError naming the field."""
        where = f"conversation {self.conversation!r} clip at frame {self.start_frame}"
        length, dim = self.avatar_motion.shape
        for name in SEQUENCE_ARRAYS:
            array = getattr(self, name)
            if array.ndim != 2 or array.shape[0] != length:
                raise ValueError(f"{where}: {name}: expected ({length}, ·) frames, got {array.shape}")
        for name in ("user_motion", "identity", "reference_motion"):
            if getattr(self, name).shape[-1] != dim:
                raise ValueError(f"{where}: {name}: expected width {dim}, got {getattr(self, name).shape}")
        if self.avatar_audio.shape[1] != self.user_audio.shape[1]:
            raise ValueError(f"{where}: user_audio: width {self.user_audio.shape[1]} != avatar_audio's")


def shard_name(conversation: str) -> str:
    """A file name for a conversation id: safe characters, plus a hash when the id had others."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", conversation).strip("._") or "conversation"
    if safe != conversation:
        safe = f"{safe[:80]}-{hashlib.sha1(conversation.encode()).hexdigest()[:8]}"
    return f"{safe}.safetensors"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_shard(path: Path, conversation: str, clips: list[Clip]) -> None:
    """All clips of one conversation -> one safetensors file, written atomically."""
    tensors: dict[str, np.ndarray] = {}
    meta = []
    for k, clip in enumerate(clips):
        clip.validate()
        for name, array in clip.arrays().items():
            tensors[f"{k}/{name}"] = np.ascontiguousarray(array, dtype=np.float32)
        meta.append(
            {"start_frame": clip.start_frame, "num_frames": clip.num_frames, "reference_frame": clip.reference_frame}
        )
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        tensors,
        str(tmp),
        metadata={"format": FORMAT, "version": str(VERSION), "conversation": conversation, "clips": json.dumps(meta)},
    )
    os.replace(tmp, path)


def read_clip(path: str | Path, key: str | int) -> dict[str, np.ndarray]:
    """One clip's arrays (the names of CLIP_ARRAYS) from a shard."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as shard:
            names = set(shard.keys())
            missing = [f"{key}/{name}" for name in CLIP_ARRAYS if f"{key}/{name}" not in names]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing}; expected every clip to have {list(CLIP_ARRAYS)}")
            return {name: shard.get_tensor(f"{key}/{name}") for name in CLIP_ARRAYS}
    except (OSError, RuntimeError) as exc:  # safetensors raises SafetensorError (a RuntimeError subclass) etc.
        raise ValueError(f"{path}: not a readable shard ({exc})") from exc


# --- ledger (resume) ----------------------------------------------------------------------------


@dataclass
class LedgerEntry:
    id: str
    status: str  # "done" (processed; maybe zero clips) or "failed" (error; retried on the next run)
    shard: str | None = None  # file name under shards/, None without clips
    frames: int = 0  # conversation frames considered (25 fps)
    clips: int = 0
    clip_frames: int = 0
    dropped_clips: int = 0  # stretches with faces shorter than min_frames
    dropped_frames: int = 0
    no_face_frames: int = 0  # frames where a face (either side) was lost beyond max_gap
    error: str | None = None


def read_ledger(root: Path) -> dict[str, LedgerEntry]:
    """Conversation id -> its latest ledger entry. A torn last line (a crash mid-write) is ignored."""
    path = root / LEDGER_FILE
    entries: dict[str, LedgerEntry] = {}
    if not path.is_file():
        return entries
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = LedgerEntry(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as exc:
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: malformed ledger line ({exc})") from exc
        entries[entry.id] = entry
    return entries


def append_ledger(root: Path, entry: LedgerEntry) -> None:
    with open(root / LEDGER_FILE, "a", encoding="utf-8") as ledger:
        ledger.write(json.dumps(asdict(entry)) + "\n")
        ledger.flush()
        os.fsync(ledger.fileno())


# --- settings and index -------------------------------------------------------------------------


def check_settings(root: Path, settings: dict[str, Any]) -> None:
    """Write settings.json on the first run; on a resume, refuse settings that differ."""
    path = root / SETTINGS_FILE
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ValueError(
                f"{path}: this output folder was prepared with other settings ({details}); "
                "resume with the same settings or use a new --out"
            )
        return
    _atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def write_index(root: Path, settings: dict[str, Any], ledger: dict[str, LedgerEntry], order: list[str]) -> dict:
    """index.json from the shards of every 'done' conversation, in manifest order."""
    clips = []
    for conv_id in order:
        entry = ledger.get(conv_id)
        if entry is None or entry.status != "done" or entry.shard is None:
            continue
        with safe_open(str(root / SHARD_DIR / entry.shard), framework="numpy") as shard:
            meta = json.loads(shard.metadata()["clips"])
        for k, clip in enumerate(meta):
            clips.append({"shard": entry.shard, "key": str(k), "conversation": conv_id, **clip})
    done = [ledger[c] for c in order if c in ledger and ledger[c].status == "done"]
    failed = [ledger[c] for c in order if c in ledger and ledger[c].status == "failed"]
    index = {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings,
        "clips": clips,
        "totals": {
            "conversations": len(order),
            "done": len(done),
            "failed": len(failed),
            "pending": len(order) - len(done) - len(failed),
            "clips": len(clips),
            "clip_frames": sum(c["num_frames"] for c in clips),
            "dropped_clips": sum(e.dropped_clips for e in done),
            "dropped_frames": sum(e.dropped_frames for e in done),
            "no_face_frames": sum(e.no_face_frames for e in done),
        },
        "failed": {e.id: e.error for e in failed},
    }
    _atomic_write_text(root / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return index


def read_index(root: str | Path) -> dict:
    """index.json of a prepared folder, checked for format and version."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a folder made by `avatar-forcing prepare`")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {index.get('format')!r} version {index.get('version')!r}; expected {FORMAT!r} {VERSION}"
        )
    return index

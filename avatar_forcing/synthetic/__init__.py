"""A synthetic world of dyadic conversations with known rules (docs/synthetic-world.md).

Procedurally rendered faces (`identity`, `render`) driven by per-frame parameters (`params`),
speech-like audio (`speech`), the two participants' rules (`behaviour`), and whole
conversations written as the manifest `avatar-forcing prepare` reads (`world`, `cli`).
"""

from avatar_forcing.synthetic.behaviour import Events, Rules
from avatar_forcing.synthetic.identity import Identity, random_identity
from avatar_forcing.synthetic.params import CHANNELS, RANGES, FaceParams
from avatar_forcing.synthetic.render import FaceRenderer
from avatar_forcing.synthetic.world import SIDES, SyntheticConversation, generate_conversation, write_conversation

__all__ = [
    "CHANNELS",
    "RANGES",
    "SIDES",
    "Events",
    "FaceParams",
    "FaceRenderer",
    "Identity",
    "Rules",
    "SyntheticConversation",
    "generate_conversation",
    "random_identity",
    "write_conversation",
]

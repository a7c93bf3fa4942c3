"""The streaming engine: condition streams in, motion blocks out, with explicit, serialisable session state."""

"""Evaluation metrics on per-frame parameter arrays (docs/metrics.md).

motion.py   rPCC, SID, Var, FD of [P] §5 / App. D.3
report.py   load generated / ground-truth sequences, compute each family, add the latency
"""

from avatar_forcing.metrics.motion import fd, frechet_distance, pcc, rpcc, sid, variance

__all__ = ["fd", "frechet_distance", "pcc", "rpcc", "sid", "variance"]

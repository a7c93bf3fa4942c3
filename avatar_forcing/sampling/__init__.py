"""Sampling: the flow-matching grid, Euler step, guidance and forward noising (euler), the block runner
(block_sampler), and the whole-track reference rollout the streaming engine must equal (reference)."""

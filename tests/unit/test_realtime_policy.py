"""The degradation policy: steps down when late, drops blocks under backlog, recovers."""

from __future__ import annotations

from services.ingress.policy import HELD_FRAME, NONE, REDUCED_NFE, RealtimePolicy


def test_late_blocks_step_down_and_on_time_blocks_step_back_up():
    policy = RealtimePolicy(nfe=10, budget_s=0.5, recover_after=3)
    assert policy.decide(backlog=0).level == NONE
    policy.observe(0.9)  # late
    decision = policy.decide(backlog=0)
    assert (decision.level, decision.max_nfe, decision.hold) == (REDUCED_NFE, 5, False)
    policy.observe(0.7)  # late again
    assert policy.decide(backlog=0).hold
    for _ in range(3):
        policy.observe(0.1)
    assert policy.decide(backlog=0).level == REDUCED_NFE
    for _ in range(3):
        policy.observe(0.1)
    assert policy.decide(backlog=0).level == NONE


def test_a_backlog_forces_held_blocks_whatever_the_level():
    policy = RealtimePolicy(nfe=10, budget_s=0.5, max_backlog=1)
    assert policy.decide(backlog=1).level == NONE
    decision = policy.decide(backlog=2)
    assert (decision.level, decision.hold) == (HELD_FRAME, True)


def test_reduced_nfe_never_goes_below_the_floor_or_above_the_session():
    policy = RealtimePolicy(nfe=6, budget_s=0.5)
    policy.observe(1.0)
    assert policy.decide(0).max_nfe == 4
    policy = RealtimePolicy(nfe=3, budget_s=0.5)
    policy.observe(1.0)
    assert policy.decide(0).max_nfe == 3


def test_after_a_slow_stretch_the_pipelined_policy_returns_to_full_quality_and_stays_there():
    """As the pipeline runs it: block k is decided before block k-1's latency is observed (it is
    still decoding). Six late blocks, then every block on time: back to NONE, and it stays."""
    policy = RealtimePolicy(nfe=10, budget_s=0.5, recover_after=3)
    levels, decoding = [], []
    for k in range(30):
        levels.append(policy.decide(backlog=0).level)
        decoding.append(0.7 if 1 <= k <= 6 else 0.2)
        if len(decoding) > 1:
            policy.observe(decoding.pop(0))
    assert max(levels) == HELD_FRAME
    recovered = 7 + 1 + 2 * 3  # the last late block observed, then recover_after on-time blocks per level
    assert levels[recovered:] == [NONE] * (30 - recovered), levels
    assert levels[recovered - 1] != NONE  # not earlier: the bound above is tight

"""init_local_ray: a start that timed out (Ray's fixed 30 s raylet wait, missed on a loaded machine)
is shut down and started again; other errors are not retried. Ray's start is replaced here because
a real timeout cannot be provoked on demand."""

from __future__ import annotations

import pytest
import ray

from services.local.ray_start import init_local_ray

TIMEOUT = Exception(
    "The current node timed out during startup. This could happen because some of the raylet failed "
    "to startup or the GCS has become overloaded."
)


class Starts:
    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls: list[dict] = []
        self.shutdowns = 0

    def init(self, **kwargs):
        self.calls.append(kwargs)
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome

    def shutdown(self):
        self.shutdowns += 1


@pytest.fixture
def starts(monkeypatch):
    def install(*outcomes):
        fake = Starts(*outcomes)
        monkeypatch.setattr(ray, "init", fake.init)
        monkeypatch.setattr(ray, "shutdown", fake.shutdown)
        return fake

    return install


def test_a_start_that_timed_out_is_shut_down_and_made_again(starts):
    fake = starts(TIMEOUT, None)
    init_local_ray(num_cpus=2, include_dashboard=False)
    assert fake.calls == [{"num_cpus": 2, "include_dashboard": False}] * 2 and fake.shutdowns == 1


def test_the_last_timeout_and_other_errors_are_raised(starts):
    fake = starts(TIMEOUT, TIMEOUT, TIMEOUT)
    with pytest.raises(Exception, match="timed out during startup"):
        init_local_ray(attempts=3)
    assert len(fake.calls) == 3 and fake.shutdowns == 2
    fake = starts(ValueError("num_cpus: bad"))
    with pytest.raises(ValueError, match="num_cpus"):
        init_local_ray(attempts=3)
    assert len(fake.calls) == 1 and fake.shutdowns == 0
    with pytest.raises(ValueError, match="attempts: expected >= 1"):
        init_local_ray(attempts=0)

"""Forward noising on the sampler: the training target is what the Euler step integrates."""

import pytest
import torch

from avatar_forcing.sampling.euler import FlowMatchEuler


def test_true_velocity_takes_the_sampler_to_x0_and_along_the_straight_path():
    sampler = FlowMatchEuler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    _, sigma = sampler.grid_point(torch.tensor([0, 125, 500, 998]))
    for s in sigma:
        s = s.view(1, 1, 1)
        x_t = sampler.add_noise(x0, noise, s)
        v = sampler.velocity_target(x0, noise)
        # One Euler step to sigma 0 with the true velocity lands on x0 (the sign convention matches).
        assert torch.allclose(sampler.step(x_t, v, s, torch.zeros_like(s)), x0, atol=1e-6)
        # A step to any lower sigma stays on the straight path x_t' = (1 - s') x0 + s' noise.
        s_next = s * 0.5
        assert torch.allclose(sampler.step(x_t, v, s, s_next), sampler.add_noise(x0, noise, s_next), atol=1e-6)


def test_grid_points_are_the_sampling_grid():
    sampler = FlowMatchEuler(1000)
    t, sigma = sampler.grid_point(torch.tensor([[0, 999], [1, 500]]))
    assert sigma[0, 0] == 1.0 and sigma[0, 1] == 0.0 and t[0, 1] == 0.0
    assert torch.allclose(t, sigma * 1000)
    # The sampler's nearest-grid sigma of a grid timestep is that grid point's sigma.
    assert sampler.sigma(float(t[1, 1])) == pytest.approx(float(sigma[1, 1]))
    with pytest.raises(ValueError, match="grid index"):
        sampler.grid_point(torch.tensor([1000]))

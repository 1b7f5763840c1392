"""The uniform time grid: steps + 1 times from T to t_end, equally spaced by (T - t_end) / steps."""

import itertools

import pytest

from nnh.generative.sde import VESDE, VPSDE
from nnh.generative.time_grid import time_grid


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
@pytest.mark.parametrize("steps,t_end", [(1, 0.0), (3, 1e-3), (10, 0.05), (57, 1e-5)])
def test_uniform_grid_has_equal_gaps_that_add_up_to_the_window(sde, steps, t_end):
    grid = time_grid(sde, steps, t_end, "uniform")
    assert len(grid) == steps + 1
    assert grid[0] == sde.T and grid[-1] == t_end
    dt = (sde.T - t_end) / steps
    gaps = [a - b for a, b in itertools.pairwise(grid)]
    assert gaps == pytest.approx([dt] * steps, rel=1e-9, abs=1e-12)

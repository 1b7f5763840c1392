"""Laws of the noise-level grids' ``data_scale`` option (issue 20), for any SDE and grid."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_sde_laws import any_sde

from nnh.generative.time_grid import CAP_FACTOR, level_cap, noise_level, time_grid

scales = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)


@given(any_sde, st.integers(1, 40), scales, st.sampled_from(["edm", "logsnr"]))
def test_capped_grid_keeps_its_ends_and_order_and_jumps_to_the_cap(sde, steps, scale, name):
    t_end = sde.epsilon if float(noise_level(sde, sde.epsilon)) > 0 else 1e-3 * sde.T
    plain = time_grid(sde, steps, t_end, name)
    try:
        grid = time_grid(sde, steps, t_end, name, data_scale=scale)
    except ValueError as err:  # only when the cap falls to the grid's floor: named
        assert "data_scale" in str(err) and steps >= 2
        return
    assert len(grid) == steps + 1 and grid[0] == sde.T and grid[-1] == t_end
    assert all(a > b for a, b in itertools.pairwise(grid))
    cap = level_cap(sde, scale)
    if cap is None or steps == 1:
        assert grid == plain  # a cap at or above lambda(T) changes nothing
    else:
        assert cap == CAP_FACTOR * scale
        assert float(noise_level(sde, grid[1])) == pytest.approx(cap, rel=1e-6)

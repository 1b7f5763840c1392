"""Score-based generative modelling on the pure core: SDEs, step functions, sampling, likelihood.

Read ``docs/generative.md``. Every function here is pure: noise and probe vectors come in as
arguments (or from an explicit ``torch.Generator``) and inputs are never modified.
"""

from nnh.generative.adaptive import Dopri5State, dopri5_solve, dopri5_start, dopri5_step
from nnh.generative.divergence import (
    PROBE_KINDS,
    exact_divergence,
    fresh_probes,
    hutchinson_divergence,
    sample_probes,
    value_and_divergence,
)
from nnh.generative.level_ode import level_field, time_of_level
from nnh.generative.likelihood import DIVERGENCES, LIKELIHOOD_METHODS, log_likelihood_ode
from nnh.generative.multistep import (
    MULTISTEP_METHODS,
    MultistepHistory,
    dpm_solver_pp_step,
)
from nnh.generative.sampler_steps import (
    langevin_corrector_step,
    probability_flow_step,
    tweedie_denoise,
)
from nnh.generative.samplers import SAMPLE_METHODS, sample_sde, score_calls
from nnh.generative.sampling import sample_reverse_sde
from nnh.generative.score_matching import denoising_score_matching_loss
from nnh.generative.sde import SDE, VESDE, VPSDE, SubVPSDE
from nnh.generative.steps import (
    ODE_METHODS,
    em_sde_step,
    evaluations_per_step,
    ode_likelihood_step,
    probability_flow_drift,
)
from nnh.generative.time_grid import TIME_GRIDS, edm_grid, logsnr_grid, time_grid, uniform_grid
from nnh.generative.unipc import UniPCHistory, unipc_step

__all__ = [
    "DIVERGENCES",
    "LIKELIHOOD_METHODS",
    "MULTISTEP_METHODS",
    "ODE_METHODS",
    "PROBE_KINDS",
    "SAMPLE_METHODS",
    "SDE",
    "TIME_GRIDS",
    "VESDE",
    "VPSDE",
    "Dopri5State",
    "MultistepHistory",
    "SubVPSDE",
    "UniPCHistory",
    "denoising_score_matching_loss",
    "dopri5_solve",
    "dopri5_start",
    "dopri5_step",
    "dpm_solver_pp_step",
    "edm_grid",
    "em_sde_step",
    "evaluations_per_step",
    "exact_divergence",
    "fresh_probes",
    "hutchinson_divergence",
    "langevin_corrector_step",
    "level_field",
    "log_likelihood_ode",
    "logsnr_grid",
    "ode_likelihood_step",
    "probability_flow_drift",
    "probability_flow_step",
    "sample_probes",
    "sample_reverse_sde",
    "sample_sde",
    "score_calls",
    "time_grid",
    "time_of_level",
    "tweedie_denoise",
    "uniform_grid",
    "unipc_step",
    "value_and_divergence",
]

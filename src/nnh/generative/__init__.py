"""Score-based generative modelling on the pure core: SDEs, step functions, sampling, likelihood.

Read ``docs/generative.md``. Every function here is pure: noise and probe vectors come in as
arguments (or from an explicit ``torch.Generator``) and inputs are never modified.
"""

from nnh.generative.divergence import (
    PROBE_KINDS,
    exact_divergence,
    hutchinson_divergence,
    sample_probes,
    value_and_divergence,
)
from nnh.generative.likelihood import log_likelihood_ode
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

__all__ = [
    "ODE_METHODS",
    "PROBE_KINDS",
    "SDE",
    "VESDE",
    "VPSDE",
    "SubVPSDE",
    "denoising_score_matching_loss",
    "em_sde_step",
    "evaluations_per_step",
    "exact_divergence",
    "hutchinson_divergence",
    "log_likelihood_ode",
    "ode_likelihood_step",
    "probability_flow_drift",
    "sample_probes",
    "sample_reverse_sde",
    "value_and_divergence",
]

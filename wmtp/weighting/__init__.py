"""Token weighting of the objectives: TD weights (verifiable), Rho-1 selection, critic targets."""

from wmtp.weighting.critic import binary_auroc, critic_targets, last_states, response_states, value_loss
from wmtp.weighting.rho1 import reference_token_ce, rho1_excess, rho1_select, rho1_selected_counts
from wmtp.weighting.td import td_weights

__all__ = [
    "binary_auroc",
    "critic_targets",
    "last_states",
    "reference_token_ce",
    "response_states",
    "rho1_excess",
    "rho1_select",
    "rho1_selected_counts",
    "td_weights",
    "value_loss",
]

"""Token weighting of the objectives."""

from wmtp.weighting.td import td_weights

__all__ = ["td_weights"]

"""Losses: the multi-head cross-entropy and the objectives' normalisation."""

from wmtp.kernels.backend import accumulation_dtype
from wmtp.losses.mtp_ce import mtp_cross_entropy, mtp_cross_entropy_with_ce

__all__ = ["accumulation_dtype", "mtp_cross_entropy", "mtp_cross_entropy_with_ce"]

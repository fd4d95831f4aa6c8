"""Losses: the multi-head cross-entropy and the objectives' normalisation."""

from wmtp.losses.mtp_ce import mtp_cross_entropy, mtp_cross_entropy_with_ce

__all__ = ["mtp_cross_entropy", "mtp_cross_entropy_with_ce"]

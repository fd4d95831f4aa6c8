"""Constants shared by the data pipeline, the losses and the recipes."""

IGNORE_INDEX: int = -100
"""Target value of a (position, head) pair that has no valid target (prompt, padding, past the end)."""

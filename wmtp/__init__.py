"""wmtp: training recipes for multi-token-prediction LLaMA models with token-weighted objectives."""

__version__ = "0.1.0"

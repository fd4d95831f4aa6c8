"""The MTP transformer and its checkpoint formats."""

from wmtp.models.args import ModelArgs
from wmtp.models.checkpoint import load_mtp, save_mtp
from wmtp.models.mtp_transformer import MTPOutput, MTPTransformer

__all__ = ["ModelArgs", "MTPOutput", "MTPTransformer", "load_mtp", "save_mtp"]

"""sdpg-trl: Self-Distilled Policy Gradient (SDPG) on top of Hugging Face TRL."""

from .config import SDPGConfig
from .trainer import SDPGTrainer

__all__ = ["SDPGConfig", "SDPGTrainer"]
__version__ = "0.1.0"

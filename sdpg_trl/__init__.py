"""sdpg-trl: Self-Distilled Policy Gradient (SDPG) on top of Hugging Face TRL."""

from .config import SDPGConfig
from .distributed import end_training
from .trainer import SDPGTrainer

__all__ = ["SDPGConfig", "SDPGTrainer", "end_training"]
__version__ = "0.1.0"

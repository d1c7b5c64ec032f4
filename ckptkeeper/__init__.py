"""ckptkeeper: declarative retention for training checkpoints."""

__version__ = "0.1.0"

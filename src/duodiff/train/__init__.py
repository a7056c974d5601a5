"""Training of every Duo-Diffusion stage: ``duodiff train CONFIG`` or :func:`duodiff.train.train`."""

from .config import STAGES, DataConfig, ModelConfig, StageConfig, TrainConfig, load_train_config
from .trainer import Trainer, train

__all__ = ["train", "Trainer", "TrainConfig", "DataConfig", "ModelConfig", "StageConfig", "load_train_config",
           "STAGES"]

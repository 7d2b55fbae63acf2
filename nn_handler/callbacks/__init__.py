"""Callbacks: hooks into the training loop whose settings and state survive save/load."""
from .base import Callback
from .early_stopping import EarlyStopping
from .loggers import CSVLogger, MLflowLogger, TensorBoardLogger
from .lr_logger import LearningRateLogger
from .model_checkpoint import ModelCheckpoint
from .sample_grid import SampleGrid

__all__ = ["Callback", "CSVLogger", "EarlyStopping", "LearningRateLogger", "MLflowLogger", "ModelCheckpoint", "SampleGrid",
           "TensorBoardLogger"]

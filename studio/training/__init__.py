"""Textual Inversion training: `Trainer(model, TrainConfig(...), images, out_dir).run(on_event, cancel)`."""

from studio.training.config import TrainConfig
from studio.training.data import TrainError
from studio.training.trainer import TrainEvent, Trainer

__all__ = ["TrainConfig", "TrainError", "TrainEvent", "Trainer"]

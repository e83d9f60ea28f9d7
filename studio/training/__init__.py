"""Textual Inversion training: `Trainer(model, TrainConfig(...), images, out_dir).run(on_event, cancel)`, and a
session's training job in a background thread (`training_snapshots`, over a `TrainingRun`)."""

from studio.training.config import TrainConfig
from studio.training.data import TrainError
from studio.training.trainer import TrainEvent, Trainer
from studio.training.run import TrainingRun, TrainingSnapshot, loss_table, training_snapshots

__all__ = ["TrainConfig", "TrainError", "TrainEvent", "Trainer", "TrainingRun", "TrainingSnapshot", "loss_table",
           "training_snapshots"]

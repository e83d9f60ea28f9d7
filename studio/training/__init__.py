"""Training: `Trainer(model, TrainConfig(...), images, out_dir).run(on_event, cancel)`, one loop for every method (what
each learns and saves in `methods/`). A session's training job in a background thread is `studio.jobs.training`'s."""

from studio.training.config import TrainConfig
from studio.training.data import TrainError
from studio.training.trainer import TrainEvent, Trainer

__all__ = ["TrainConfig", "TrainError", "TrainEvent", "Trainer"]

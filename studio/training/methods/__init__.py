"""What each training method learns and saves; the loop in studio/training/trainer.py is the same for all of them.

A method defines only what differs: the weights that learn besides the word (none for `ti`; a UNet LoRA for `pivotal`
and `lora`; the UNet itself for `dreambooth`; o*_V and i* for `perfusion`), their learning rate, the phrase a training prompt says for the concept,
and how the result is written and read back. The latent cache, events, previews, cancel, checkpoints with bit-exact
resume, the divergence guard and the out-of-memory ending belong to the loop.
"""

from __future__ import annotations

from studio.training.methods.base import Method
from studio.training.methods.dreambooth import DreamBooth
from studio.training.methods.lora import DreamBoothLora, Pivotal
from studio.training.methods.perfusion import Perfusion
from studio.training.methods.quick_tuning import QuickTuning
from studio.training.methods.ti import TextualInversion
from studio.training.methods.xti import ExtendedTextualInversion

METHOD_CLASSES: dict[str, type[Method]] = {cls.name: cls for cls in (TextualInversion, ExtendedTextualInversion,
                                                                      Pivotal, DreamBoothLora, DreamBooth, Perfusion)}


def method_for(trainer) -> Method:
    """The method object of `trainer.config.method`, bound to that trainer's model and config (ti started from an
    encoder's output: `QuickTuning`)."""
    if trainer.config.init_from_encoder:
        return QuickTuning(trainer)
    return METHOD_CLASSES[trainer.config.method](trainer)


__all__ = ["METHOD_CLASSES", "Method", "method_for"]

"""The one base class of the mistakes a user can fix.

Every engine error whose message says what to do (a concept file, a model, a training run, a picture, a word)
derives from `UserError`; the UI shows them as a message (gr.Error) and the CLI prints them as one line, both by
catching this class. It is a ValueError, so code that has always caught ValueError for bad input still catches them.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix: the message names what is wrong and says what to do."""


class ModelError(UserError, RuntimeError):
    """A model could not be loaded or run; the message says what to do. Also a RuntimeError, as torch's own errors
    are: an out-of-memory `OutOfMemory` is one, and the trainer catches RuntimeErrors to find those. Here rather than in
    `studio.engine.models` so that `single_file` (which models loads lazily) needs nothing of models."""


class LoraError(UserError):
    """A LoRA file the studio cannot read or does not apply (a LyCORIS variant, a file with no LoRA weights); the
    message names what the file is and what to do. Raised by `studio.engine.learned.lora_files` and `.lora`."""

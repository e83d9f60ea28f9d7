"""Pictures for an evaluation, drawn through the studio's own generation path (`studio.engine.generate`), so what is
scored is what a user would get: `generate_pictures` for a run, `Drawer` for the Evaluate tab (progress, cancel,
and every picture kept to show beside the scores)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image

from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.word import Concept
from studio.evaluation.config import EvalConfig, ScoreConfig

# on_progress(done, total, what): denoising steps done of all the evaluation's steps, and the prompt being drawn.
OnProgress = Callable[[int, int, str], None]
# draw(prompt, concepts, n, first seed) -> n pictures
Draw = Callable[[str, Sequence[Concept], int, int], list[Image.Image]]


def generate_pictures(model, prompt: str, concepts: Sequence[Concept] = (), n: int = 1, seed: int = 0,
                      cfg: EvalConfig | None = None, init_image: Image.Image | None = None) -> list[Image.Image]:
    """`n` pictures for one prompt (seeds seed .. seed+n-1) with `cfg`'s sampling settings."""
    cfg = cfg or EvalConfig()
    req = GenerateRequest(prompt, concepts=list(concepts), seed=seed, steps=cfg.steps, guidance=cfg.guidance,
                          scheduler=cfg.scheduler, batch=n, init_image=init_image, strength=cfg.strength)
    return generate(model, req).images


@dataclass
class Sample:
    """One generated picture and where it came from."""

    image: Image.Image
    prompt: str
    seed: int
    subject: str  # "concept" (the prompt holds the word) or "plain" (plain words instead)
    role: str  # "reconstruction" or "editing"


class Drawer:
    """Draws pictures for prompts, keeping them as `samples`, reporting progress and stopping on `cancel`."""

    def __init__(self, model, cfg: ScoreConfig, total_draws: int, on_progress: OnProgress | None,
                 cancel: threading.Event | None):
        self.model, self.cfg, self.cancel, self.on_progress = model, cfg, cancel, on_progress
        self.total = total_draws * cfg.steps
        self.done = 0
        self.samples: list[Sample] = []

    def for_subject(self, subject: str, reconstruction: Sequence[str]) -> Draw:
        """A `Draw` that tags what it draws with `subject` and its role (reconstruction when in `reconstruction`)."""
        def draw(prompt: str, concepts: Sequence[Concept], n: int, seed: int) -> list[Image.Image]:
            req = GenerateRequest(prompt, concepts=list(concepts), seed=seed, steps=self.cfg.steps,
                                  guidance=self.cfg.guidance, scheduler=self.cfg.scheduler, batch=n, preview_every=0)
            start = self.done

            def on_step(step: int, total: int, _preview) -> None:
                if self.on_progress is not None:
                    self.on_progress(min(self.total, start + step * self.cfg.steps // max(1, total)), self.total,
                                     prompt)

            images = generate(self.model, req, on_step=on_step, cancel=self.cancel).images
            self.done = start + self.cfg.steps
            role = "reconstruction" if prompt in reconstruction else "editing"
            self.samples += [Sample(im, prompt, seed + k, subject, role) for k, im in enumerate(images)]
            return images
        return draw

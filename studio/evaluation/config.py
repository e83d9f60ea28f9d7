"""What an evaluation is asked to do: `ScoreConfig` for scoring one concept (the Evaluate tab), `EvalConfig` for the
whole run on the demo world (`studio eval`), and the error a request that cannot be met raises."""

from __future__ import annotations

from dataclasses import dataclass

from studio.evaluation.prompts import RECONSTRUCTION_PROMPTS


class ScoringError(ValueError):
    """The concept cannot be scored as asked; the message says what to configure."""


@dataclass
class ScoreConfig:
    """How much to draw. Defaults are a quick look: on the demo model 16 prompts x 2 pictures x 10 steps, about 20 s
    on a shared 2-core CPU (1.3 s per prompt measured)."""

    samples: int = 2  # pictures per prompt, seeds seed .. seed+samples-1 (the paper draws 64)
    steps: int = 10  # half the studio's 20, to keep a look cheap; 20 gives figures comparable to docs/benchmarks.md
    guidance: float = 7.5  # the studio's default
    scheduler: str = "euler_a"  # the studio's default
    seed: int = 0
    kind: str = "object"  # "object" | "style": which prompts; a concept set's own kind wins
    plain_words: str | None = None  # replace S* ("in the style of S*" for styles) in the baseline prompts;
    #                                  None: the set's plain words, else the word training started from

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= 16:
            raise ScoringError(f"samples must be between 1 and 16 pictures per prompt, not {self.samples}")
        if not 1 <= self.steps <= 150:
            raise ScoringError(f"steps must be between 1 and 150, not {self.steps}")
        if self.kind not in RECONSTRUCTION_PROMPTS:
            raise ScoringError(f"kind must be 'object' or 'style', not {self.kind!r}")


@dataclass
class EvalConfig:
    """What a whole run measures and how much; defaults are the figures reported in docs/benchmarks.md."""

    prompts: int = 200  # base compliance prompts (the issue asks for >= 200)
    images: int = 4  # pictures per concept prompt
    steps: int = 20  # sampling steps (the studio's default)
    guidance: float = 7.5  # the studio's default classifier-free guidance
    scheduler: str = "euler_a"  # the studio's default sampler
    train_steps: int | None = None  # None: TrainConfig's default (the "default settings" the issue asks for)
    strength: float = 0.6  # img2img strength for style transfer: enough to restyle, little enough to keep content
    concepts: list[str] | None = None  # None: every bundled set
    seed: int = 0
    skip_compliance: bool = False
    skip_concepts: bool = False

"""Score one learned concept the way the Textual Inversion paper does (Gal et al. 2022, section 5): reconstruction
(do "a photo of a S*" pictures look like the concept?) and editability (do "S* on a red background"-style prompts
still do what the rest of the prompt says?), each beside the same prompts with plain words instead of S*.

Every score carries its 95% interval over prompts x pictures and n (studio/evaluation/stats.py); each margin (the
word minus the plain words, paired by prompt and seed) carries its own.

Two scorers, used wherever they apply (both at once when both do), each given by the caller:

- a judge (studio.evaluation.world.Judge; the demo's is `studio.demo.evaluate.DemoJudge`), on the built-in demo
  model, against a ground truth: a bundled concept set, or what the judge reads alike in the training pictures
  (studio/evaluation/judging.py), with the demo's identity encoder beside it when there are training pictures
  (an IdentityScorer: do the pictures show *this* individual?);
- CLIP, on any model, when a CLIP model (a ClipScorer, hub id or local folder) is given (studio/evaluation/clip.py).

    scores = score_concept(model, concept, ScoreConfig(samples=2), judge=DemoJudge(),
                           concept_set=load_concept_set("purple-star"))
    scores.score("reconstruction"), [s.image for s in scores.samples]

A quick look, not the paper's figures: a few seeds per prompt by default (the paper draws 64); raise `samples` and
`steps` for numbers to compare with docs/benchmarks.md.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from studio.engine.learned.word import Concept, check_fits
from studio.evaluation.clip import ClipScorer
from studio.evaluation.config import EvalConfig, ScoreConfig, ScoringError
from studio.evaluation.drawing import Drawer, OnProgress, Sample
from studio.evaluation.judging import ground_truth_from_pictures, score_subject
from studio.evaluation.prompts import (EDITING_PROMPTS, RECONSTRUCTION_PROMPTS, editing_prompts,
                                       reconstruction_prompts, without_subject)
from studio.evaluation.stats import Estimate, hierarchical_bootstrap, paired_margin
from studio.evaluation.world import GroundTruth, IdentityScorer, Judge


@dataclass
class ScoreLine:
    """One row of the score table: a measure with the concept's word and with plain words, each with its 95%
    interval, and their paired margin (None: not measured)."""

    measure: str
    concept: Estimate | None
    plain: Estimate | None
    compares: str
    margin: Estimate | None = None


@dataclass
class ConceptScores:
    """What `score_concept` returns: the table's rows and every picture they were measured on."""

    token: str
    scorers: list[str]  # "judge" and/or "clip"
    lines: list[ScoreLine]
    samples: list[Sample]
    plain_words: str | None
    ground_truth: str | None  # the concept set whose attributes the judge checked
    notes: list[str] = field(default_factory=list)  # what was not measured, and why
    seconds: float = 0.0

    def estimate(self, measure: str, plain: bool = False) -> Estimate | None:
        """`measure` ("reconstruction", "identity", "prompt fidelity", "CLIP image-image", ...) with its interval."""
        for line in self.lines:
            if line.measure == measure:
                return line.plain if plain else line.concept
        return None

    def score(self, measure: str, plain: bool = False) -> float | None:
        """The mean of `measure`, or None."""
        est = self.estimate(measure, plain)
        return None if est is None else est.mean


def _plain_words(concept: Concept, cfg: ScoreConfig, cs: GroundTruth | None, kind: str) -> str | None:
    """What replaces the concept's phrase (S*, or "in the style of S*") in the baseline prompts."""
    if cfg.plain_words and cfg.plain_words.strip():
        return cfg.plain_words.strip()
    if cs is not None and cs.plain_subject:
        return cs.plain_subject
    init = concept.meta.get("init_text", "").strip()
    if not init or init == "*":
        return None
    return f"in the style of {init}" if kind == "style" else init


def _nothing_applies(model, concept: Concept, judge: Judge | None) -> ScoringError:
    if judge is not None:
        return ScoringError(
            f"{concept.token} has no ground truth to score against: on the demo model the judge checks a concept "
            f"against a bundled concept set's attributes. Pick the set it was trained on as ground truth "
            f"({', '.join(judge.ground_truths()) or 'none bundled'}), or give the pictures it was trained on (the "
            "judge reads what they share), or give a CLIP model (hub id or folder)")
    return ScoringError(
        f"scoring {concept.token} on {model.name} needs a CLIP model: give a hub id (openai/clip-vit-large-patch14 "
        "is the paper's; openai/clip-vit-base-patch32 is smaller) or a local folder holding one. The judge reads "
        "only the built-in demo model's pictures")


# A subject: how the prompts name the concept ("concept": its word; "plain": plain words) -> (phrase, concepts used).
Subjects = dict[str, tuple[str, list[Concept]]]


def score_concept(model, concept: Concept, cfg: ScoreConfig | None = None, *, judge: Judge | None = None,
                  concept_set: GroundTruth | None = None, reference_images: Sequence[Image.Image] = (),
                  clip: ClipScorer | str | Path | None = None, identity: IdentityScorer | None = None,
                  on_progress: OnProgress | None = None, cancel: threading.Event | None = None) -> ConceptScores:
    """Score `concept` on `model` (a LoadedModel): `judge` on the demo model when `concept_set` gives ground truth
    (with `identity`, the demo's identity encoder, beside it when there are training pictures), CLIP when `clip` is
    a ClipScorer, hub id or folder; raises ScoringError when neither applies. Every score carries its 95% interval
    over prompts x pictures (studio/evaluation/stats.py) and each margin (word minus plain words) its own.

    `reference_images`: the concept's training pictures, for CLIP's image-image similarity (default: the concept
    set's) and, on the demo model without a concept set, for the judge's ground truth (what it reads alike in
    all of them). `cancel` stops within one denoising step (raises studio.engine.generate.Cancelled).
    """
    # 1. Check inputs and decide which scorers apply.
    t0 = time.time()
    cfg = cfg or ScoreConfig()
    check_fits(concept, model.encoder_dims, where=f"concept {concept.token!r}")
    judge = judge if model.is_demo else None  # the judge reads the demo world's pictures only
    if judge is not None and concept_set is None and reference_images:
        concept_set = ground_truth_from_pictures(judge, reference_images, concept.token, cfg.kind)
    use_judge = judge is not None and concept_set is not None
    if not use_judge and not clip:
        raise _nothing_applies(model, concept, judge)
    if isinstance(clip, (str, Path)):
        clip = ClipScorer.load(clip, model.device)
    kind = cfg.kind if concept_set is None else ("style" if concept_set.kind == "style" else "object")
    plain = _plain_words(concept, cfg, concept_set, kind)
    references = list(reference_images) or ([Image.open(p).convert("RGB") for p in concept_set.images]
                                            if concept_set is not None else [])
    subjects: Subjects = {"concept": (f"in the style of {concept.token}" if kind == "style" else concept.token,
                                      [concept])}
    if plain:
        subjects["plain"] = (plain, [])
    notes = [] if plain else ["no plain-words baseline: give the words to compare with"]

    # 2. Draw and judge (the demo model), or 3. draw for CLIP alone (any model).
    if use_judge:
        drawer, lines = _draw_and_judge(model, judge, concept_set, subjects, cfg, on_progress, cancel,
                                        identity if model.is_demo else None, references)
    else:
        drawer, lines = _draw_for_clip(model, kind, subjects, cfg, on_progress, cancel), []

    # 4. CLIP similarities on the same pictures.
    if clip:
        lines += _clip_lines(clip, drawer.samples, subjects, references, cfg.seed)
        if not references:
            notes.append("no CLIP image-image similarity: give the pictures the concept was trained on")
    return ConceptScores(concept.token, ["judge"] * use_judge + ["clip"] * bool(clip), lines, drawer.samples, plain,
                         concept_set.name if use_judge else None, notes, round(time.time() - t0, 1))


def _draw_and_judge(model, judge: Judge, cs: GroundTruth, subjects: Subjects, cfg: ScoreConfig,
                    on_progress: OnProgress | None, cancel: threading.Event | None,
                    identity: IdentityScorer | None = None,
                    references: Sequence[Image.Image] = ()) -> tuple[Drawer, list[ScoreLine]]:
    """The judge's prompts for every subject, drawn and scored against `cs` (studio/evaluation/judging.py), with
    identity against `references` when an identity scorer is given."""
    eval_cfg = EvalConfig(images=cfg.samples, steps=cfg.steps, guidance=cfg.guidance, scheduler=cfg.scheduler,
                          seed=cfg.seed)
    draws = sum(len(reconstruction_prompts(cs, s)) + len(editing_prompts(cs, s)) for s, _ in subjects.values())
    drawer = Drawer(model, cfg, draws, on_progress, cancel)
    judged = {}
    for name, (subject, used) in subjects.items():
        recon = reconstruction_prompts(cs, subject)
        judged[name] = score_subject(model, judge, cs, used, subject, eval_cfg, draw=drawer.for_subject(name, recon),
                                     identity=identity, references=references)
    return drawer, _judge_lines(judged, cs, eval_cfg)


def _draw_for_clip(model, kind: str, subjects: Subjects, cfg: ScoreConfig, on_progress: OnProgress | None,
                   cancel: threading.Event | None) -> Drawer:
    """The CLIP prompts (any model) for every subject, drawn; the drawer keeps the pictures."""
    recon_of = {name: [p.format(s) for p in RECONSTRUCTION_PROMPTS[kind]] for name, (s, _) in subjects.items()}
    prompts = {name: recon_of[name] + [p.format(s) for p in EDITING_PROMPTS[kind]]
               for name, (s, _) in subjects.items()}
    drawer = Drawer(model, cfg, sum(map(len, prompts.values())), on_progress, cancel)
    for name, (subject, used) in subjects.items():
        draw = drawer.for_subject(name, recon_of[name])
        for k, prompt in enumerate(prompts[name]):
            draw(prompt, used, cfg.samples, cfg.seed + 100 * k)
    return drawer


def _judge_lines(judged: dict[str, dict], cs: GroundTruth, cfg: EvalConfig) -> list[ScoreLine]:
    """Rows for the judge's (and identity's) scores of the concept's word and (when drawn) the plain words."""
    ti, plain = judged["concept"], judged.get("plain", {})

    def line(measure: str, key: str, compares: str) -> ScoreLine:
        margin = (paired_margin([ti["per_picture"][key]], [plain["per_picture"][key]], cfg.resamples, cfg.seed)
                  if plain else None)
        return ScoreLine(measure, _from(ti.get(key)), _from(plain.get(key)), compares, margin)

    wanted = ", ".join(f"{k} {'/'.join(v) if isinstance(v, list) else v}" for k, v in cs.attributes.items())
    lines = [line("reconstruction", "reconstruction",
                  f"judge: share of the attributes of {cs.name} ({wanted}) seen in 'a photo of S*' pictures")]
    if "identity" in ti:
        lines.append(line("identity", "identity",
                          "identity encoder: mean cosine of 'a photo of S*' pictures and the training pictures"))
    lines.append(line("prompt fidelity", "prompt_fidelity",
                      "judge: share of what each edit prompt names (not the concept's look), seen in its pictures"))
    for prompt, value in ti["editing_prompts"].items():
        lines.append(ScoreLine(f"· {prompt}", _from(value), _from(plain.get("editing_prompts", {}).get(prompt)),
                               "judge: the edit asked for is seen"))
    if "identity_under_edits" in ti:
        lines.append(line("identity under edits", "identity_under_edits",
                          "identity encoder: the edited pictures against the training pictures"))
    if "attributes_under_edits" in ti:
        lines.append(line("attributes under edits", "attributes_under_edits",
                          "judge: the concept's attributes still seen in the edited pictures"))
    if "color_spread" in ti:
        entropy = ti["color_spread"]["entropy"]
        plain_entropy = plain.get("color_spread", {}).get("entropy")
        n = sum(ti["color_spread"]["colors"].values())
        lines.append(ScoreLine("colour spread", Estimate(entropy, entropy, entropy, n),
                               None if plain_entropy is None else Estimate(plain_entropy, plain_entropy,
                                                                           plain_entropy, n),
                               "judge: entropy of the colours drawn (1 = all eight equally often; no interval)"))
    return lines


def _from(d: dict | None) -> Estimate | None:
    return None if d is None else Estimate.from_dict(d)


def _clip_lines(clip: ClipScorer, samples: list[Sample], subjects: Subjects,
                references: list[Image.Image], seed: int = 0) -> list[ScoreLine]:
    """CLIP image-image (vs the training pictures) and image-text (vs the prompt without S*) rows, per picture and
    pooled over prompts x pictures with their intervals."""
    values: dict[str, dict[str, list[list[float]]]] = {"image": {}, "text": {}}
    for name, (subject, _) in subjects.items():
        mine = [s for s in samples if s.subject == name]
        prompts = list(dict.fromkeys(s.prompt for s in mine))  # in drawing order
        recon = [[s.image for s in mine if s.prompt == p] for p in prompts
                 if any(s.prompt == p and s.role == "reconstruction" for s in mine)]
        edits = [[s for s in mine if s.prompt == p] for p in prompts
                 if any(s.prompt == p and s.role == "editing" for s in mine)]
        if references and recon:
            values["image"][name] = [clip.image_similarities(images, references) for images in recon]
        if edits:
            values["text"][name] = [clip.text_similarities([s.image for s in group],
                                                           [without_subject(s.prompt, subject) for s in group])
                                    for group in edits]

    def line(kind: str, measure: str, compares: str) -> ScoreLine:
        mine, plain = values[kind].get("concept"), values[kind].get("plain")
        est = (lambda v: None if v is None else hierarchical_bootstrap([v], seed=seed))
        margin = paired_margin([mine], [plain], seed=seed) if mine and plain else None
        return ScoreLine(measure, est(mine), est(plain), compares, margin)

    lines = []
    if values["image"]:
        lines.append(line("image", "CLIP image-image",
                          f"{clip.source}: cosine of 'a photo of S*' pictures and the training pictures"))
    if values["text"]:
        lines.append(line("text", "CLIP image-text", f"{clip.source}: cosine of edit pictures and their prompt "
                                                     "without S*"))
    return lines

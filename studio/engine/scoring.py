"""Score one learned concept the way the Textual Inversion paper does (Gal et al. 2022, section 5): reconstruction
(do "a photo of S*" pictures look like the concept?) and editability (do "S* on a red background"-style prompts
still do what the rest of the prompt says?), each beside the same prompts with plain words instead of S*.

Two scorers, used wherever they apply (both at once when both do):

- the judge, on the built-in demo model (studio/demo/judge.py reads every attribute of a demo-world picture):
  reconstruction is the share of a bundled concept set's ground-truth attributes seen in "a photo of a S*" pictures,
  editability the share of what each edit prompt asks for; the prompts and scoring are `studio.demo.evaluate`'s;
- CLIP, on any model, when a CLIP model (hub id or local folder) is given: reconstruction is the mean pairwise
  image-image cosine similarity of "a photo of a S*" pictures and the concept's training pictures, editability the
  mean image-text cosine similarity of each edit prompt's pictures and that prompt with S* left out (the paper's).

    scores = score_concept(model, concept, ScoreConfig(samples=2), concept_set=load_concept_set("purple-star"))
    scores.score("reconstruction"), [s.image for s in scores.samples]

A quick look, not the paper's figures: a few seeds per prompt by default (the paper draws 64); raise `samples` and
`steps` for numbers to compare with docs/benchmarks.md.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from PIL import Image

from studio.engine.concepts import Concept, check_fits
from studio.engine.generate import GenerateRequest, generate

if TYPE_CHECKING:  # the demo world is only needed when the judge scores
    from studio.demo.concept_sets import ConceptSet

# on_progress(done, total, what): denoising steps done of all the evaluation's steps, and the prompt being drawn.
OnProgress = Callable[[int, int, str], None]

# Prompts for any model (the CLIP scorer); "{}" is the subject phrase: the concept's word or the plain words. The
# demo model gets studio.demo.evaluate's prompts instead, which stay inside the demo world's vocabulary.
RECONSTRUCTION_PROMPTS = {"object": ("a photo of a {}", "a rendering of a {}"),
                          "style": ("a painting {}", "a picture {}")}
EDITING_PROMPTS = {"object": ("a photo of a {} on a red background", "a {} in watercolor style",
                              "a photo of a {} on the beach", "a {} in pixel art style"),
                   "style": ("a dog {}", "a house {}", "a bowl of fruit {}", "a portrait of a woman {}")}


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
class ScoreLine:
    """One row of the score table: a measure with the concept's word and with plain words (None: not measured)."""

    measure: str
    concept: float | None
    plain: float | None
    compares: str


@dataclass
class Sample:
    """One generated picture and where it came from."""

    image: Image.Image
    prompt: str
    seed: int
    subject: str  # "concept" (the prompt holds the word) or "plain" (plain words instead)
    role: str  # "reconstruction" or "editing"


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

    def score(self, measure: str, plain: bool = False) -> float | None:
        """The value of `measure` ("reconstruction", "editability", "CLIP image-image", ...), or None."""
        for line in self.lines:
            if line.measure == measure:
                return line.plain if plain else line.concept
        return None


# ---------------------------------------------------------------------------------------------- CLIP

class ClipScorer:
    """CLIP image and text embeddings (transformers CLIPModel + CLIPProcessor) and their cosine similarities."""

    def __init__(self, model, processor, source: str):
        self.model = model.eval()
        self.processor = processor
        self.source = source

    @classmethod
    def load(cls, source: str | Path, device: torch.device | str = "cpu") -> "ClipScorer":
        """A CLIP model from a hub id (e.g. `openai/clip-vit-large-patch14`, the paper's) or a local folder."""
        from transformers import CLIPModel, CLIPProcessor

        source = str(source).strip()
        if not source:
            raise ScoringError("no CLIP model given: name a hub id like openai/clip-vit-base-patch32 or a folder")
        try:
            model = CLIPModel.from_pretrained(source)
            processor = CLIPProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:  # not found, offline, or not a CLIP checkpoint
            raise ScoringError(f"could not load the CLIP model {source!r} ({str(exc).splitlines()[0]}): give a hub id "
                               "such as openai/clip-vit-base-patch32 (downloaded once, or found in the cache when "
                               "offline) or a local folder holding a CLIP model and its processor files") from exc
        return cls(model.to(device), processor, source)

    @staticmethod
    def _unit(features) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
        emb = features if isinstance(features, torch.Tensor) else features.pooler_output
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length image embeddings [N, D]."""
        device = next(self.model.parameters()).device
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(device)
        return self._unit(self.model.get_image_features(pixel_values=inputs["pixel_values"]))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings [N, D] (texts longer than CLIP's 77 tokens are cut)."""
        device = next(self.model.parameters()).device
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True).to(device)
        return self._unit(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]))

    def image_similarity(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
        """Mean cosine similarity over every (picture, reference) pair: the paper's reconstruction score."""
        if not images or not references:
            raise ScoringError("image similarity needs pictures on both sides")
        return float((self.image_embeddings(images) @ self.image_embeddings(references).T).mean())

    def text_similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> float:
        """Mean cosine similarity of each picture with its own text: the paper's editability score."""
        if len(images) != len(texts) or not images:
            raise ScoringError(f"text similarity needs one text per picture, got {len(images)} and {len(texts)}")
        return float((self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1).mean())


def without_subject(prompt: str, subject: str) -> str:
    """The prompt with the concept's phrase left out ("a photo of a S* on the beach" -> "a photo of a on the beach"),
    which is what the paper compares edited pictures with."""
    return re.sub(r"\s+", " ", prompt.replace(subject, " ")).strip()


# ---------------------------------------------------------------------------------------------- drawing

class _Drawer:
    """Draws pictures for prompts through the studio's generation path, keeping them, with progress and cancel."""

    def __init__(self, model, cfg: ScoreConfig, total_draws: int, on_progress: OnProgress | None,
                 cancel: threading.Event | None):
        self.model, self.cfg, self.cancel, self.on_progress = model, cfg, cancel, on_progress
        self.total = total_draws * cfg.steps
        self.done = 0
        self.samples: list[Sample] = []

    def for_subject(self, subject: str, reconstruction: Sequence[str]):
        """A `draw(prompt, concepts, n, seed)` that tags what it draws with `subject` and its role."""
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


# ---------------------------------------------------------------------------------------------- scoring

def concept_set_for(token: str) -> "ConceptSet | None":
    """The bundled concept set (assets/concepts/) whose word is `token`, if any: its ground truth applies."""
    from studio.demo.concept_sets import list_concept_sets, load_concept_set

    for name in list_concept_sets():
        cs = load_concept_set(name)
        if cs.token == token:
            return cs
    return None


def ground_truth_from_pictures(pictures: Sequence[Image.Image], token: str, kind: str) -> "ConceptSet | None":
    """On the demo world, what the judge reads alike in every training picture, as a concept set to score against.

    Objects: the shape, colour and pattern of pictures holding one object (backgrounds vary and are not the
    concept); styles: the look (style, background) and a pattern every object shares. None when nothing is shared.
    """
    from studio.demo.concept_sets import ConceptSet
    from studio.demo.judge import Judge

    preds = Judge.load().predict(list(pictures))
    if kind == "style":
        seen = [{"style": p["style"], "background": p["background"],
                 **({"pattern": p["objects"][0]["pattern"]}
                    if len({o["pattern"] for o in p["objects"]}) == 1 else {})} for p in preds]
    else:
        seen = [{k: p["objects"][0][k] for k in ("shape", "color", "pattern")} for p in preds if p["count"] == 1]
    shared = {k: v for k, v in seen[0].items() if all(s.get(k) == v for s in seen)} if seen else {}
    if not shared:
        return None
    return ConceptSet("the training pictures", Path("."), [], kind, token, "", kind, shared, "", "", "read by the judge")


def _plain_words(concept: Concept, cfg: ScoreConfig, cs: "ConceptSet | None", kind: str) -> str | None:
    """What replaces the concept's phrase (S*, or "in the style of S*") in the baseline prompts."""
    if cfg.plain_words and cfg.plain_words.strip():
        return cfg.plain_words.strip()
    if cs is not None and cs.plain_subject:
        return cs.plain_subject
    init = concept.meta.get("init_text", "").strip()
    if not init or init == "*":
        return None
    return f"in the style of {init}" if kind == "style" else init


def _nothing_applies(model, concept: Concept, judge_possible: bool) -> ScoringError:
    from studio.demo.concept_sets import list_concept_sets

    if judge_possible:
        return ScoringError(
            f"{concept.token} has no ground truth to score against: on the demo model the judge checks a concept "
            f"against a bundled concept set's attributes. Pick the set it was trained on as ground truth "
            f"({', '.join(list_concept_sets()) or 'none bundled'}), or give the pictures it was trained on (the "
            "judge reads what they share), or give a CLIP model (hub id or folder)")
    return ScoringError(
        f"scoring {concept.token} on {model.name} needs a CLIP model: give a hub id (openai/clip-vit-large-patch14 "
        "is the paper's; openai/clip-vit-base-patch32 is smaller) or a local folder holding one. The judge reads "
        "only the built-in demo model's pictures")


def score_concept(model, concept: Concept, cfg: ScoreConfig | None = None, *,
                  concept_set: "ConceptSet | None" = None, reference_images: Sequence[Image.Image] = (),
                  clip: ClipScorer | str | Path | None = None, on_progress: OnProgress | None = None,
                  cancel: threading.Event | None = None) -> ConceptScores:
    """Score `concept` on `model` (a LoadedModel): the judge on the demo model when `concept_set` gives ground truth,
    CLIP when `clip` is a ClipScorer, hub id or folder; raises ScoringError when neither applies.

    `reference_images`: the concept's training pictures, for CLIP's image-image similarity (default: the concept
    set's) and, on the demo model without a concept set, for the judge's ground truth (what it reads alike in
    all of them). `cancel` stops within one denoising step (raises studio.engine.generate.Cancelled).
    """
    # 1. Check inputs and decide which scorers apply.
    t0 = time.time()
    cfg = cfg or ScoreConfig()
    check_fits(concept, model.encoder_dims, where=f"concept {concept.token!r}")
    if model.is_demo and concept_set is None and reference_images:
        concept_set = ground_truth_from_pictures(reference_images, concept.token, cfg.kind)
    use_judge = bool(model.is_demo and concept_set is not None)
    if not use_judge and not clip:
        raise _nothing_applies(model, concept, judge_possible=model.is_demo)
    if isinstance(clip, (str, Path)):
        clip = ClipScorer.load(clip, model.device)
    kind = cfg.kind if concept_set is None else ("style" if concept_set.kind == "style" else "object")
    plain = _plain_words(concept, cfg, concept_set, kind)
    references = list(reference_images) or ([Image.open(p).convert("RGB") for p in concept_set.images]
                                            if concept_set is not None else [])
    subjects = {"concept": (f"in the style of {concept.token}" if kind == "style" else concept.token, [concept])}
    if plain:
        subjects["plain"] = (plain, [])
    notes = [] if plain else ["no plain-words baseline: give the words to compare with"]
    lines: list[ScoreLine] = []

    # 2. Draw and judge (the demo model): studio.demo.evaluate's prompts and per-subject scoring.
    if use_judge:
        from studio.demo.evaluate import EvalConfig, editing_prompts, reconstruction_prompts, score_subject
        from studio.demo.judge import Judge

        judge = Judge.load()
        eval_cfg = EvalConfig(images=cfg.samples, steps=cfg.steps, guidance=cfg.guidance, scheduler=cfg.scheduler,
                              seed=cfg.seed)
        draws = sum(len(reconstruction_prompts(concept_set, s)) + len(editing_prompts(concept_set, s))
                    for s, _ in subjects.values())
        drawer = _Drawer(model, cfg, draws, on_progress, cancel)
        judged = {}
        for name, (subject, used) in subjects.items():
            recon = reconstruction_prompts(concept_set, subject)
            judged[name] = score_subject(model, judge, concept_set, used, subject, eval_cfg,
                                         draw=drawer.for_subject(name, recon))
        lines += _judge_lines(judged, concept_set)
    # 3. Draw for CLIP alone (any model).
    else:
        recon_of = {name: [p.format(s) for p in RECONSTRUCTION_PROMPTS[kind]] for name, (s, _) in subjects.items()}
        prompts = {name: recon_of[name] + [p.format(s) for p in EDITING_PROMPTS[kind]]
                   for name, (s, _) in subjects.items()}
        drawer = _Drawer(model, cfg, sum(map(len, prompts.values())), on_progress, cancel)
        for name, (subject, used) in subjects.items():
            draw = drawer.for_subject(name, recon_of[name])
            for k, prompt in enumerate(prompts[name]):
                draw(prompt, used, cfg.samples, cfg.seed + 100 * k)

    # 4. CLIP similarities on the same pictures.
    if clip:
        lines += _clip_lines(clip, drawer.samples, subjects, references)
        if not references:
            notes.append("no CLIP image-image similarity: give the pictures the concept was trained on")
    return ConceptScores(concept.token, ["judge"] * use_judge + ["clip"] * bool(clip), lines, drawer.samples, plain,
                         concept_set.name if use_judge else None, notes, round(time.time() - t0, 1))


def _judge_lines(judged: dict[str, dict], cs: "ConceptSet") -> list[ScoreLine]:
    """Rows for the judge's scores of the concept's word and (when drawn) the plain words."""
    ti, plain = judged["concept"], judged.get("plain", {})
    wanted = ", ".join(f"{k} {'/'.join(v) if isinstance(v, list) else v}" for k, v in cs.attributes.items())
    lines = [ScoreLine("reconstruction", ti["reconstruction"], plain.get("reconstruction"),
                       f"judge: share of the attributes of {cs.name} ({wanted}) seen in 'a photo of S*' pictures"),
             ScoreLine("editability", ti["editability"], plain.get("editability"),
                       "judge: share of what each edit prompt asks for, seen in its pictures")]
    for prompt, value in ti["editing_prompts"].items():
        lines.append(ScoreLine(f"· {prompt}", value, plain.get("editing_prompts", {}).get(prompt),
                               "judge: the edit asked for is seen"))
    if "identity_under_edits" in ti:
        lines.append(ScoreLine("identity under edits", ti["identity_under_edits"], plain.get("identity_under_edits"),
                               "judge: the concept's attributes still seen in the edited pictures"))
    if "color_spread" in ti:
        lines.append(ScoreLine("colour spread", ti["color_spread"]["entropy"],
                               plain.get("color_spread", {}).get("entropy"),
                               "judge: entropy of the colours drawn (1 = all eight equally often)"))
    return lines


def _clip_lines(clip: ClipScorer, samples: list[Sample], subjects: dict[str, tuple[str, list]],
                references: list[Image.Image]) -> list[ScoreLine]:
    """CLIP image-image (vs the training pictures) and image-text (vs the prompt without S*) rows."""
    values: dict[str, dict[str, float]] = {"image": {}, "text": {}}
    for name, (subject, _) in subjects.items():
        mine = [s for s in samples if s.subject == name]
        recon = [s.image for s in mine if s.role == "reconstruction"]
        edits = [s for s in mine if s.role == "editing"]
        if references and recon:
            values["image"][name] = round(clip.image_similarity(recon, references), 4)
        if edits:
            values["text"][name] = round(clip.text_similarity(
                [s.image for s in edits], [without_subject(s.prompt, subject) for s in edits]), 4)
    lines = []
    if values["image"]:
        lines.append(ScoreLine("CLIP image-image", values["image"].get("concept"), values["image"].get("plain"),
                               f"{clip.source}: cosine of 'a photo of S*' pictures and the training pictures"))
    if values["text"]:
        lines.append(ScoreLine("CLIP image-text", values["text"].get("concept"), values["text"].get("plain"),
                               f"{clip.source}: cosine of edit pictures and their prompt without S*"))
    return lines

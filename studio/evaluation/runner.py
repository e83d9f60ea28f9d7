"""The paper's evaluation on a world whose ground truth is known, scored by a judge instead of CLIP and, beside it,
an identity encoder instead of DINO (`studio eval` runs it on the demo world with `studio.demo.evaluate`'s
`DemoJudge` and `DemoWorld`). It measures:

1. Prompt compliance of the base model: for random world captions, the share of each attribute the caption names
   that the judge finds in the generated picture (Gal et al. measure editability with CLIP text similarity; the
   judge's per-attribute agreement is the exact analogue on a world whose ground truth is known).
2. For every concept set (bundled, given as folders, or held-out individuals no model has seen), after Textual
   Inversion with default settings (`TrainConfig` defaults, the set's initial word and template), in a
   DreamBench-shaped protocol (subjects x prompts x pictures; EvalConfig says how many and what it costs):
   - reconstruction: judge agreement of "a photo of a S*"-style generations with the set's attributes;
   - identity (DreamBench's DINO / CLIP-I): the identity encoder's cosine of those pictures and the set's own,
     with the set's pictures against each other as the ceiling (DreamBench's "real images" row);
   - prompt fidelity (DreamBench's CLIP-T, the paper's editability): agreement with the scene attributes that
     prompts like "S* on a black background", "a small S* on the top", "S* in mosaic style", "a S* and a S*" name,
     never with the concept's own look; and identity under those edits;
   - the same scores for the best plain-language prompt (the baseline Textual Inversion has to beat), and the
     margins, paired by prompt and seed;
   - for the diverse set, the colour spread of "a photo of a S*" against the plain word (bias reduction);
   - pooled over subjects (held-out ones apart from the others): every score and margin again.
   Every score carries n and a 95% hierarchical-bootstrap interval (studio/evaluation/stats.py).
   With `methods` (`studio eval --methods ti,pivotal,lora,dreambooth`), every method is also trained on the same
   sets with its defaults and scored on the same prompts and seeds (`compare_methods`): per method identity,
   prompt fidelity and reconstruction pooled with their intervals, its margins over TI paired prompt for prompt,
   and the mean file size and training time (DreamBench's table of methods). `encoder` encodes the pictures instead
   of training (an image concept, `studio encode`), `encoder+ti` trains a word beside that (quick-tuning); both with
   the IP-Adapter `EvalConfig.adapter`, checked before any work.
3. Style transfer: img2img from plain renders with "... in the style of S*": the style's look appears and the
   content stays.
4. Composition: two concepts in one prompt, both present.

Every generation goes through `studio.engine.generate` and every concept through `studio.training.Trainer`, the
same code paths the studio uses (a LoRA applied per request by the LoRA runtime, a dreambooth folder loaded as a
model). Seeds are fixed, so a run is reproducible on one machine.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from studio.engine.generate import Cancelled
from studio.engine.learned.image_encoding import encode_pictures
from studio.engine.learned.image_prompt import ImageConcept
from studio.engine.learned.image_prompt_files import save_image_concept
from studio.engine.learned.ip_adapter import image_encoder_folder, resolve_adapter
from studio.engine.learned.lora import LoraFile
from studio.engine.learned.lora_files import pivotal_embeddings
from studio.engine.learned.word import Concept
from studio.engine.models import ModelManager
from studio.engine.names import file_stem
from studio.engine.pictures import open_picture
from studio.evaluation.config import ENCODER_METHODS, EvalConfig
from studio.evaluation.denoising import conditioning_gap, denoising_loss, initial_concept
from studio.evaluation.drawing import generate_pictures
from studio.evaluation.judging import agreement, mean, per_attribute, score_subject
from studio.evaluation.prompts import STYLE_TRANSFER_CONTENT, subject_phrases
from studio.evaluation.stats import Estimate, bootstrap_mean, hierarchical_bootstrap, paired_margin, ratio
from studio.evaluation.world import BundledSet, IdentityScorer, Judge, World
from studio.training import TrainConfig, Trainer, TrainError
from studio.training.config import METHODS
from studio.training.methods import METHOD_CLASSES

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- 1. compliance

def prompt_compliance(model, judge: Judge, world: World, cfg: EvalConfig, progress: Progress = print) -> dict[str, Any]:
    """Judge agreement with every attribute named in `cfg.prompts` random world captions, one picture each."""
    all_checks, preds, named_list, t0 = [], [], [], time.time()
    examples = []
    for i, (text, named) in enumerate(world.captions(cfg.prompts, cfg.seed)):
        image = generate_pictures(model, text, seed=cfg.seed + i, cfg=cfg)[0]
        pred = judge.predict([image])[0]
        checks = judge.check(pred, named)
        all_checks.append(checks)
        preds.append(pred)
        named_list.append(named)
        if len(examples) < 5:
            examples.append({"prompt": text, "judged": pred, "checks": checks})
        if (i + 1) % 50 == 0:
            progress(f"compliance: {i + 1}/{cfg.prompts} prompts, {time.time() - t0:.0f}s")
    # Chance level: each picture judged against the *next* prompt's attributes. A model that ignores its prompt
    # scores the same on both; the difference is what the prompt bought.
    chance = ([judge.check(preds[(i + 1) % len(preds)], named_list[i]) for i in range(len(preds))]
              if len(preds) > 1 else [])
    # Intervals: captions are the unit (one picture each), resampled with replacement; an attribute a caption
    # names twice ("a red X and a blue Y": colour) is that caption's mean of the two checks.
    per_caption: dict[str, list[list[list[float]]]] = {}
    for checks in all_checks:
        mine: dict[str, list[float]] = {}
        for key, ok in checks.items():
            mine.setdefault(key.split(".")[-1], []).append(float(ok))
        for key, values in mine.items():
            per_caption.setdefault(key, []).append([values])
    per_attribute_ci = {k: hierarchical_bootstrap(v, cfg.resamples, cfg.seed) for k, v in sorted(per_caption.items())}
    mean_ci = bootstrap_mean([sum(c.values()) / len(c) for c in all_checks], cfg.resamples, cfg.seed)
    all_right = bootstrap_mean([float(all(c.values())) for c in all_checks], cfg.resamples, cfg.seed)
    return {
        "prompts": cfg.prompts,
        "per_attribute": {k: round(e.mean, 4) for k, e in per_attribute_ci.items()},
        "mean": round(mean_ci.mean, 4),
        "all_named_right": round(all_right.mean, 4),
        "per_attribute_ci": {k: e.as_dict() for k, e in per_attribute_ci.items()},
        "mean_ci": mean_ci.as_dict(),
        "all_named_right_ci": all_right.as_dict(),
        "chance_per_attribute": per_attribute(chance),
        "chance_mean": mean([sum(c.values()) / len(c) for c in chance]),
        "seconds": round(time.time() - t0, 1),
        "seconds_per_picture": round((time.time() - t0) / max(1, cfg.prompts), 3),
        "examples": examples,
    }


# ---------------------------------------------------------------------------------------------- 2. concepts

@dataclass
class Trained:
    """What one training run gave: what generation uses, how a prompt names it, how long it took and what it weighs
    on disk."""

    result: Concept | LoraFile | ImageConcept | Path  # the word (ti); a LoRA, pivotal's with its word; a model folder
    # (dreambooth); an image concept (encoder, encoder+ti)
    subject: str  # the method's phrase: the word (ti, pivotal) or DreamBooth's "<token> <class>" (lora, dreambooth)
    seconds: float
    steps: int  # the steps it trained (fewer than asked when it stopped once learned)
    path: Path  # the file (or, for dreambooth, the folder) the trainer wrote
    size_bytes: int  # that file's bytes (with a pivotal pair's words file), or every file's in the folder


def train_method(model, cs: BundledSet, out_dir: Path, method: str = "ti", steps: int | None = None, seed: int = 0,
                 vectors: int | None = None, progress: Progress = print,
                 cancel: threading.Event | None = None, overrides: dict[str, Any] | None = None) -> Trained:
    """Train `method` (studio.training.config.METHODS) on a concept set with its default settings and the set's
    initial word (lora, dreambooth: as the class word) and template. A model folder (dreambooth) is written as
    `out_dir / <word>`, a file into `out_dir`."""
    kwargs: dict[str, Any] = {"steps": steps} if steps else {}
    if vectors and METHOD_CLASSES[method].learns_word:
        kwargs["n_vectors"] = vectors
    kwargs.update(overrides or {})
    config = TrainConfig(cs.token, init_text=cs.init_word, template=cs.template, seed=seed, method=method, **kwargs)
    out = Path(out_dir) / file_stem(cs.token) if METHOD_CLASSES[method].writes_folder else Path(out_dir)
    t0 = time.time()
    last = {"t": t0}

    def on_event(event) -> None:
        if event.kind == "step" and time.time() - last["t"] > 30:
            last["t"] = time.time()
            progress(f"  {cs.name} ({method}): step {event.step}/{event.total} loss {event.loss:.4f}")
        elif event.kind in ("warning", "failed"):
            progress(f"  {cs.name} ({method}): {event.kind}: {event.message}")
        if event.kind in ("finished", "cancelled"):
            last["path"], last["step"] = event.path, event.step

    trainer = Trainer(model, config, cs.images, out)
    result = trainer.run(on_event, cancel)
    seconds = time.time() - t0
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"cancelled while training {cs.name} ({method})")
    path = Path(last["path"])
    return Trained(result, trainer.method.phrase(), seconds, last["step"], path, disk_bytes(path))


def encode_method(model, cs: BundledSet, out_dir: Path, adapter: str) -> Trained:
    """The encoder "method" (`studio encode`): the set's pictures made an image concept by `adapter` in one pass, the
    set's initial word standing where its token is written; timed from the pictures to the concept (a training run's
    time counterpart) and sized on disk like one."""
    t0 = time.time()
    pictures = [open_picture(path) for path in cs.images]
    concept = encode_pictures(model, pictures, cs.token, adapter, prompt_text=cs.init_word)
    seconds = time.time() - t0
    path = save_image_concept(concept, Path(out_dir) / f"{file_stem(cs.token)}.safetensors")
    concept.path = path
    return Trained(concept, cs.token, seconds, 0, path, disk_bytes(path))


def check_encoder_methods(methods: Sequence[str], adapter: str) -> None:
    """Before any work: the adapter (and its image encoder) the encoder methods need is on this machine (one line
    saying where it was looked for and how to get it, else)."""
    used = [m for m in methods if m in ENCODER_METHODS]
    if used:
        image_encoder_folder(resolve_adapter(adapter, who=f"studio eval --methods {','.join(used)}"))


def disk_bytes(path: Path) -> int:
    """What a result weighs on disk: a file with a diffusers pivotal pair's words file beside it, if any
    (`pivotal_embeddings`), or every file in a model folder."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    words = pivotal_embeddings(path)
    return path.stat().st_size + (words.stat().st_size if words is not None else 0)


def train_concept(model, cs: BundledSet, out_dir: Path, steps: int | None = None, seed: int = 0,
                  vectors: int | None = None,
                  progress: Progress = print) -> tuple[Concept, float]:
    """Textual Inversion on a concept set with default settings; returns (Concept, seconds)."""
    trained = train_method(model, cs, out_dir, "ti", steps, seed, vectors, progress)
    return trained.result, trained.seconds


def evaluate_concept(model, judge: Judge, cs: BundledSet, cfg: EvalConfig, work_dir: Path,
                     identity: IdentityScorer | None = None,
                     progress: Progress = print) -> tuple[dict[str, Any], Concept]:
    """Train one concept with default settings and score it against its best plain prompt: every score with its
    interval, the margins (word minus plain words, paired by prompt and seed) with theirs, and, with an `identity`
    scorer, the training pictures' own cross-similarity (the ceiling)."""
    progress(f"training {cs.name} ({cs.kind}, init '{cs.init_word}') ...")
    loss_before = denoising_loss(model, cs, initial_concept(model, cs))
    trained = train_method(model, cs, work_dir, "ti", cfg.train_steps, cfg.seed, cfg.train_vectors, progress=progress)
    concept, seconds = trained.result, trained.seconds
    loss_after = denoising_loss(model, cs, concept)
    references = [Image.open(p).convert("RGB") for p in cs.images] if identity is not None else []
    ti = score_subject(model, judge, cs, [concept], subject_phrases(cs, cs.token), cfg, identity=identity,
                       references=references)
    plain = score_subject(model, judge, cs, [], subject_phrases(cs, None), cfg, identity=identity,
                          references=references)
    margins = {name: paired_margin([values], [plain["per_picture"][name]], cfg.resamples, cfg.seed).as_dict()
               for name, values in ti["per_picture"].items()}
    result = {"kind": cs.kind, "token": cs.token, "init_word": cs.init_word, "best_prompt": cs.best_prompt,
              "train_seconds": round(seconds, 1), "train_steps": int(concept.meta.get("steps", 0)),
              "file_bytes": trained.size_bytes,
              "denoising_loss": {"initial_word": round(loss_before, 5), "trained": round(loss_after, 5)},
              "textual_inversion": ti, "plain_prompt": plain, "margins": margins,
              "reconstruction_gain": margins["reconstruction"]["mean"]}
    if references:
        ceiling = [round(v, 4) for v in identity.cross_similarity(references)]
        result["ceiling"] = {"identity": hierarchical_bootstrap([[ceiling]], cfg.resamples, cfg.seed).as_dict(),
                             "per_picture": ceiling}
        result["identity_of_ceiling"] = round(ti["identity"]["mean"] / result["ceiling"]["identity"]["mean"], 4)
    progress(f"  {cs.name}: reconstruction {Estimate.from_dict(ti['reconstruction'])} (plain "
             f"{Estimate.from_dict(plain['reconstruction'])})"
             + (f", identity {Estimate.from_dict(ti['identity'])} (plain {Estimate.from_dict(plain['identity'])}, "
                f"real pictures {Estimate.from_dict(result['ceiling']['identity'])})" if references else "")
             + f", trained in {seconds:.0f}s")
    return result, concept


POOLED = ("reconstruction", "identity", "prompt_fidelity", "identity_under_edits", "attributes_under_edits")


def pooled_scores(concepts: dict[str, dict[str, Any]], cfg: EvalConfig) -> dict[str, Any] | None:
    """Subjects pooled (DreamBench's table): every score over subjects x prompts x pictures with the hierarchical
    bootstrap, the margins paired, identity's ceiling and TI's share of it (subjects resampled jointly).

    Objects only (individuals and named objects): a style's prompts ask other things. None without any.
    """
    done = {name: r for name, r in concepts.items() if "error" not in r and r["kind"] == "object"}
    if not done:
        return None
    ti = [r["textual_inversion"]["per_picture"] for r in done.values()]
    plain = [r["plain_prompt"]["per_picture"] for r in done.values()]
    out: dict[str, Any] = {"subjects": sorted(done), "textual_inversion": pooled(ti, cfg),
                           "plain_prompt": pooled(plain, cfg), "margins": pooled_margins(ti, plain, cfg)}
    if "identity" in out["textual_inversion"]:
        ceilings = [[r["ceiling"]["per_picture"]] for r in done.values()]
        out["ceiling"] = hierarchical_bootstrap(ceilings, cfg.resamples, cfg.seed).as_dict()
        out["identity_of_ceiling"] = ratio([s["identity"] for s in ti], ceilings, cfg.resamples, cfg.seed).as_dict()
    return out


def pooled(subjects: list[dict[str, list[list[float]]]], cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """Each measure of `POOLED` over subjects x prompts x pictures (`per_picture` dicts of `score_subject`), with
    its hierarchical-bootstrap interval; a measure some subject lacks (identity not measured) is left out rather than
    pooled over a different set of subjects."""
    return {measure: hierarchical_bootstrap([s[measure] for s in subjects], cfg.resamples, cfg.seed).as_dict()
            for measure in POOLED if subjects and all(measure in s for s in subjects)}


def pooled_margins(a: list[dict[str, list[list[float]]]], b: list[dict[str, list[list[float]]]],
                   cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """`a` minus `b` for each measure both have for every subject, paired by subject, prompt and seed."""
    return {measure: paired_margin([s[measure] for s in a], [s[measure] for s in b], cfg.resamples,
                                   cfg.seed).as_dict()
            for measure in POOLED if a and all(measure in s for s in a) and all(measure in s for s in b)}


# ---------------------------------------------------------------------------------------------- 2b. methods

# The Textual Inversion paper's variants (Gal et al. 2022, its reconstruction-editability figure) and the P+ word, as
# the TrainConfig settings that make them, on top of each set's default settings; a method's name is a variant too.
# Progressive extension follows its own schedule (vectors added at a third and two thirds of the steps), so it runs
# every step rather than stopping when learned. The regularization weight pulls ||v - v_init||^2 (a mean over the
# vector's numbers) back at about a tenth of a typical denoising loss when a vector has moved by its own norm.
VARIANTS: dict[str, dict[str, Any]] = {
    "ti": {},
    "multi3": {"n_vectors": 3},
    "progressive": {"progressive": "1:0,2:{third},3:{two_thirds}", "stop_when_learned": False},
    "regularized": {"regularization": 1.0},
    "per-image": {"per_image_tokens": True},
    "xti": {"method": "xti"},
    "ti-all-steps": {"stop_when_learned": False},  # the default run without stopping early (benchmarks)
    "multi3-all-steps": {"n_vectors": 3, "stop_when_learned": False},  # benchmarks/identity_gap.py
    "dreambooth-all-steps": {"method": "dreambooth", "stop_when_learned": False},  # the same: the UNet's own reach
    # pivotal and lora with a LoRA on the text encoder(s) too (--text-encoder-lora; issue 30's methods rows)
    "pivotal-te": {"method": "pivotal", "text_encoder_lora": True},
    "lora-te": {"method": "lora", "text_encoder_lora": True},
    **{m: {"method": m} for m in METHODS if m not in ("ti", "xti")},
    # quick-tuning: TI from the encoder's output (its adapter: EvalConfig.adapter); "encoder" trains nothing
    "encoder+ti": {"init_from_encoder": EvalConfig.adapter},
}


def variant_settings(name: str, steps: int | None) -> dict[str, Any]:
    """The TrainConfig settings of variant `name` for a run of `steps` (None: TrainConfig's default)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
    total = steps or TrainConfig.steps
    settings = dict(VARIANTS[name])
    if "progressive" in settings:
        settings["progressive"] = settings["progressive"].format(third=max(1, total // 3),
                                                                 two_thirds=max(2, 2 * total // 3))
    return settings


def score_method(model, judge: Judge, cs: BundledSet, trained: Trained, cfg: EvalConfig,
                 identity: IdentityScorer | None = None) -> dict[str, Any]:
    """`score_subject` of what `trained` learned, with its training time and size: a word or a LoRA is applied per
    request on `model` (the LoRA runtime turns it off again after each); a dreambooth folder is loaded as a model of
    its own, as the Model tab loads it, and freed after."""
    references = [Image.open(p).convert("RGB") for p in cs.images] if identity is not None else []
    tuned, concepts = model, [trained.result]
    if isinstance(trained.result, Path):
        tuned, concepts = ModelManager().load(str(trained.result)), []
    scores = score_subject(tuned, judge, cs, concepts, subject_phrases(cs, trained.subject), cfg, identity=identity,
                           references=references)
    return {"kind": cs.kind, **scores, "subject": trained.subject, "train_seconds": round(trained.seconds, 3),
            "train_steps": trained.steps, "file_bytes": trained.size_bytes, "path": str(trained.path)}


def compare_methods(model, judge: Judge, sets: dict[str, BundledSet], methods: list[str], cfg: EvalConfig,
                    work_dir: Path, identity: IdentityScorer | None = None, progress: Progress = print,
                    known: dict[str, dict[str, dict[str, Any]]] | None = None,
                    cancel: threading.Event | None = None) -> dict[str, Any]:
    """Train every method (or variant: `VARIANTS`) on every set and score it the way `evaluate_concept` scores Textual Inversion (the same
    prompts and seeds, so methods pair prompt for prompt); `known[method][set]` are scores already taken (TI's, by
    `evaluate_concept`) and are not taken again.

    Per method: its scores pooled over the object sets (`pooled`: identity, prompt fidelity, ... with intervals),
    each method's margin over TI paired by subject, prompt and seed (`vs_ti`, when TI is among them), and the mean
    file size, training time and steps trained over every set it trained on; `concepts` holds each set's own scores. Each file goes
    under `work_dir / method`."""
    out: dict[str, Any] = {}
    for method in methods:
        per_set: dict[str, dict[str, Any]] = {}
        for name, cs in sets.items():
            if name in (known or {}).get(method, {}):
                per_set[name] = known[method][name]
                continue
            progress(f"training {name} with {method} ...")
            try:
                trained = learn_method(model, cs, Path(work_dir) / method, method, cfg, progress, cancel)
                per_set[name] = score_method(model, judge, cs, trained, cfg, identity)
            except (ValueError, TrainError) as exc:  # one unusable set must not cost the other scores
                per_set[name] = {"kind": cs.kind, "error": str(exc)}
                progress(f"  {name} ({method}): skipped: {exc}")
        done = {n: r for n, r in per_set.items() if "error" not in r}
        objects = [r["per_picture"] for r in done.values() if r["kind"] == "object"]
        out[method] = {"subjects": sorted(n for n, r in done.items() if r["kind"] == "object"),
                       **pooled(objects, cfg),
                       "file_bytes": round(float(np.mean([r["file_bytes"] for r in done.values()])))
                       if done else None,
                       "train_seconds": mean([r["train_seconds"] for r in done.values()]),
                       "train_steps": mean([r["train_steps"] for r in done.values()]),
                       "concepts": per_set}
    if "ti" in out:
        ti = out["ti"]["concepts"]
        for method, row in out.items():
            both = [n for n in row["subjects"] if n in out["ti"]["subjects"]]
            if method != "ti" and both:
                row["vs_ti"] = pooled_margins([row["concepts"][n]["per_picture"] for n in both],
                                              [ti[n]["per_picture"] for n in both], cfg)
    return out


def learn_method(model, cs: BundledSet, out_dir: Path, method: str, cfg: EvalConfig, progress: Progress = print,
                 cancel: threading.Event | None = None) -> Trained:
    """Method or variant `method` on one set with `cfg`'s steps, seed and vectors: trained (`train_method`), or for
    "encoder" encoded (`encode_method`) with `cfg.adapter`, which "encoder+ti" starts from."""
    if method == "encoder":
        return encode_method(model, cs, out_dir, cfg.adapter)
    settings = variant_settings(method, cfg.train_steps)
    if "init_from_encoder" in settings:
        settings["init_from_encoder"] = cfg.adapter
    return train_method(model, cs, out_dir, settings.pop("method", "ti"), cfg.train_steps, cfg.seed,
                        cfg.train_vectors, progress, cancel, settings)


# ---------------------------------------------------------------------------------------------- 3-4.

def style_transfer(model, judge: Judge, world: World, cs: BundledSet, concept: Concept,
                   cfg: EvalConfig) -> dict[str, Any]:
    """img2img from plain flat renders on white: does the style's look appear, and does the content stay?"""
    out: dict[str, Any] = {}
    for name, concepts, clause in (("textual_inversion", [concept], f"in the style of {cs.token}"),
                                   ("plain_prompt", [], cs.plain_subject)):
        style_scores, content_scores, success = [], [], []
        for k, (shape, color) in enumerate(STYLE_TRANSFER_CONTENT):
            images = generate_pictures(model, f"a {color} {shape} {clause}", concepts, cfg.images,
                                       cfg.seed + 10 * k, cfg, init_image=world.plain_render(shape, color))
            for pred in judge.predict(images):
                look = judge.check(pred, cs.attributes)
                kept = judge.check(pred, {"shape": shape, "color": color})
                style_scores.append(sum(look.values()) / len(look))
                content_scores.append(sum(kept.values()) / len(kept))
                success.append(look.get("style", False) and look.get("background", False) and kept["shape"])
        out[name] = {"style_agreement": mean(style_scores), "content_kept": mean(content_scores),
                     "success": mean(success)}
    out["strength"] = cfg.strength
    return out


def composition(model, judge: Judge, sets: dict[str, BundledSet], concepts: dict[str, Concept],
                cfg: EvalConfig) -> dict[str, Any]:
    """Two learned words in one prompt: "a S1 and a S2" (objects) and "a photo of a S1 in the style of S2"."""
    objects = [n for n in concepts if sets[n].kind == "object"]
    styles = [n for n in concepts if sets[n].kind == "style"]
    results: dict[str, Any] = {}
    for a, b in list(itertools.combinations(objects, 2))[:cfg.composition_pairs]:
        sa, sb = sets[a], sets[b]
        wanted = {"count": 2, "objects": [sa.attributes, sb.attributes]}
        row = {}
        for name, words, used in (("textual_inversion", (sa.token, sb.token), [concepts[a], concepts[b]]),
                                  ("plain_prompt", (sa.plain_subject, sb.plain_subject), [])):
            images = generate_pictures(model, f"a {words[0]} and a {words[1]}", used, cfg.images, cfg.seed + 5, cfg)
            score, checks = agreement(judge, images, wanted)
            both = [all(v for k, v in c.items() if k.endswith((".shape", ".color"))) for c in checks]
            row[name] = {"agreement": score, "both_present": mean(both)}
        results[f"{a} + {b}"] = row
    for a, b in zip(objects, styles):
        sa, sb = sets[a], sets[b]
        wanted = {"shape": sa.attributes["shape"], "color": sa.attributes["color"],
                  "style": sb.attributes["style"], "background": sb.attributes["background"]}
        row = {}
        for name, prompt, used in (
                ("textual_inversion", f"a photo of a {sa.token} in the style of {sb.token}",
                 [concepts[a], concepts[b]]),
                ("plain_prompt", f"a photo of a {sa.plain_subject} {sb.plain_subject}", [])):
            images = generate_pictures(model, prompt, used, cfg.images, cfg.seed + 6, cfg)
            score, checks = agreement(judge, images, wanted)
            row[name] = {"agreement": score, "both_present": mean([all(c.values()) for c in checks])}
        results[f"{a} in the style of {b}"] = row
    return results


# ---------------------------------------------------------------------------------------------- the run

def run_evaluation(model_source: str | None, judge: Judge, world: World, cfg: EvalConfig | None = None,
                   work_dir: Path | None = None, progress: Progress = print,
                   methods: Sequence[str] = (), variants: Sequence[str] = (),
                   chart: Path | None = None) -> dict[str, Any]:
    """Run every part of the evaluation on the model at `model_source` (None: the built-in demo) with the `judge`
    and `world` given, and return the results dict (what `studio eval --out` writes). `methods` (of
    studio.training.config.METHODS) are also trained on every concept set and compared (`compare_methods`), and so
    are `variants` (of `VARIANTS`: the paper's), whose reconstruction-editability chart goes to `chart` (a PNG)."""
    cfg = cfg or EvalConfig()
    check_encoder_methods([*methods, *variants], cfg.adapter)
    t0 = time.time()
    model = ModelManager().load(model_source)
    results = _about_the_run(model, judge, cfg)

    # 1. Does the base model listen to text, and how well does it follow prompts?
    results["conditioning_gap"] = conditioning_gap(model, world)
    progress(f"text conditioning: {results['conditioning_gap']}")
    if not cfg.skip_compliance:
        progress(f"prompt compliance over {cfg.prompts} captions ...")
        results["compliance"] = prompt_compliance(model, judge, world, cfg, progress)

    # 2. Concepts: the sets named (or, without held-out subjects, every bundled one) and the held-out subjects,
    #    scored alike; the held-out ones and the others are pooled apart.
    if not cfg.skip_concepts:
        work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="studio-eval-"))
        sets, held_out = _concept_sets(world, cfg, work)
        identity = _identity_scorer(world, results, progress)
        results["concepts"], trained = _evaluate_concepts(model, judge, sets, held_out, cfg, work, identity, progress)
        results["pooled"] = _pooled_by_group(results["concepts"], cfg)
        known = _ti_rows(results["concepts"])
        if methods:
            results["methods"] = compare_methods(model, judge, sets, list(methods), cfg, work / "methods", identity,
                                                 progress, known)
        if variants:  # TI is the reference every variant's margin is taken against (and the chart's first point)
            names = ["ti", *[v for v in variants if v != "ti"]]
            results["variants"] = compare_methods(model, judge, sets, names, cfg, work / "variants", identity,
                                                  progress, known)
        if chart is not None and (methods or variants):
            results["chart"] = str(variants_chart(results, chart))

        # 3. Style transfer, 4. composition.
        results["style_transfer"] = {n: style_transfer(model, judge, world, sets[n], trained[n], cfg)
                                     for n in trained if sets[n].kind == "style"}
        progress("composition ...")
        results["composition"] = composition(model, judge, sets, trained, cfg)
    results["seconds"] = round(time.time() - t0, 1)
    return results


def _concept_sets(world: World, cfg: EvalConfig, work: Path) -> tuple[dict[str, BundledSet], dict[str, BundledSet]]:
    """Step 2's sets: those `cfg` names (or, without held-out subjects, every bundled one) and the held-out subjects
    (made under `work`); returns all of them and the held-out ones apart."""
    sets = world.concept_sets(cfg.concepts) if cfg.concepts or not cfg.held_out else {}
    held_out = world.held_out_sets(cfg.held_out, cfg.seed, work / "held-out") if cfg.held_out else {}
    sets.update(held_out)
    return sets, held_out


def _evaluate_concepts(model, judge: Judge, sets: dict[str, BundledSet], held_out: dict[str, BundledSet],
                       cfg: EvalConfig, work: Path, identity: IdentityScorer | None,
                       progress: Progress) -> tuple[dict[str, Any], dict[str, Concept]]:
    """`evaluate_concept` on every set, each result marked held out or not; returns the results and the concepts
    trained. A set that cannot be trained or scored is recorded with the reason, and the others go on."""
    scores: dict[str, Any] = {}
    trained: dict[str, Concept] = {}
    for name, cs in sets.items():
        try:
            scores[name], trained[name] = evaluate_concept(model, judge, cs, cfg, work, identity, progress)
        except (ValueError, TrainError) as exc:  # one unusable set must not cost the scores already taken
            scores[name] = {"kind": cs.kind, "error": str(exc)}
            progress(f"  {name}: skipped: {exc}")
        scores[name]["held_out"] = name in held_out
    return scores, trained


def _pooled_by_group(concepts: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    """`pooled_scores` over the held-out subjects and over the given sets, apart; a group with nothing to pool is
    left out."""
    by_group = {group: pooled_scores({n: r for n, r in concepts.items() if r["held_out"] == is_held}, cfg)
                for group, is_held in (("held_out", True), ("given", False))}
    return {group: p for group, p in by_group.items() if p}


def _ti_rows(concepts: dict[str, Any]) -> dict[str, Any]:
    """`compare_methods`' `known` rows for TI from `evaluate_concept`'s results: TI's scores are the ones just taken,
    so methods and variants pair with them rather than train it again."""
    return {"ti": {name: {"kind": r["kind"], "error": r["error"]} if "error" in r else
                   {"kind": r["kind"], **r["textual_inversion"], "subject": r["token"],
                    "train_seconds": r["train_seconds"], "train_steps": r["train_steps"],
                    "file_bytes": r["file_bytes"]}
                   for name, r in concepts.items()}}


def variants_chart(results: dict[str, Any], path: Path) -> Path:
    """The paper's figure from a run's `methods` and `variants`: identity against prompt fidelity per method or
    variant, plain words (the held-out subjects' pooled plain-prompt scores, else the given sets') and the real
    pictures' identity."""
    from studio.evaluation.chart import draw_tradeoff, tradeoff_points

    pooled_runs = results.get("pooled", {})
    group = pooled_runs.get("held_out") or pooled_runs.get("given") or {}
    rows = {**results.get("methods", {}), **results.get("variants", {})}
    points = tradeoff_points(rows, plain=group.get("plain_prompt"), ceiling=group.get("ceiling"))
    subjects = len(group.get("subjects", []))
    return draw_tradeoff(points, path, title=f"demo world, {subjects} subject{'s' if subjects != 1 else ''}, "
                                             "95% intervals")


def _identity_scorer(world: World, results: dict[str, Any], progress: Progress) -> IdentityScorer | None:
    """The world's identity scorer, its info recorded in `results`; None (and the reason recorded) without one."""
    try:
        identity = world.identity()
    except ValueError as exc:  # the world should have one but cannot load it: every other score still counts
        results["identity"] = {"error": str(exc)}
        progress(f"identity not measured: {exc}")
        return None
    if identity is not None:
        results["identity"] = {"quality": identity.info.get("quality", {})}
    return identity


def _about_the_run(model, judge: Judge, cfg: EvalConfig) -> dict[str, Any]:
    """The results' header: model, settings, the judge's own accuracy, the machine, and how the model was trained."""
    about: dict[str, Any] = {
        "model": model.name, "source": model.source, "config": asdict(cfg),
        "judge_accuracy": judge.info.get("accuracy", {}),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {model.device}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    log_file = Path(model.source) / "training_log.json"
    if log_file.is_file():
        log = json.loads(log_file.read_text())
        about["model_training"] = {k: log.get(k) for k in ("minutes", "n_images", "vae_steps", "unet_steps", "seconds")}
    return about

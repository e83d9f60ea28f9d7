"""The paper's evaluation on a world whose ground truth is known, scored by a judge instead of CLIP (`studio eval`
runs it on the demo world with `studio.demo.evaluate`'s `DemoJudge` and `DemoWorld`). It measures:

1. Prompt compliance of the base model: for random world captions, the share of each attribute the caption names
   that the judge finds in the generated picture (Gal et al. measure editability with CLIP text similarity; the
   judge's per-attribute agreement is the exact analogue on a world whose ground truth is known).
2. For every bundled concept set, after Textual Inversion with default settings (`TrainConfig` defaults, the
   set's initial word and template):
   - reconstruction: judge agreement of "a photo of a S*"-style generations with the set's attributes;
   - editability: agreement with the rest of prompts like "S* on a {colour} background", "S* in {style} style",
     "two shapes, a S* and a S*";
   - the same two scores for the best plain-language prompt (the baseline Textual Inversion has to beat);
   - for the diverse set, the colour spread of "a photo of a S*" against the plain word (bias reduction).
3. Style transfer: img2img from plain renders with "... in the style of S*": the style's look appears and the
   content stays.
4. Composition: two concepts in one prompt, both present.

Every generation goes through `studio.engine.generate` and every concept through `studio.training.Trainer`, the
same code paths the studio uses. Seeds are fixed, so a run is reproducible on one machine.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from studio.engine.concepts import Concept
from studio.engine.models import ModelManager
from studio.evaluation.config import EvalConfig
from studio.evaluation.denoising import conditioning_gap, denoising_loss, initial_concept
from studio.evaluation.drawing import generate_pictures
from studio.evaluation.judging import agreement, mean, per_attribute, score_subject
from studio.evaluation.prompts import STYLE_TRANSFER_CONTENT, subject_phrases
from studio.evaluation.world import BundledSet, Judge, World
from studio.training import TrainConfig, Trainer, TrainError

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
    return {
        "prompts": cfg.prompts,
        "per_attribute": per_attribute(all_checks),
        "mean": mean([sum(c.values()) / len(c) for c in all_checks]),
        "all_named_right": mean([all(c.values()) for c in all_checks]),
        "chance_per_attribute": per_attribute(chance),
        "chance_mean": mean([sum(c.values()) / len(c) for c in chance]),
        "seconds": round(time.time() - t0, 1),
        "seconds_per_picture": round((time.time() - t0) / max(1, cfg.prompts), 3),
        "examples": examples,
    }


# ---------------------------------------------------------------------------------------------- 2. concepts

def train_concept(model, cs: BundledSet, out_dir: Path, steps: int | None = None, seed: int = 0,
                  progress: Progress = print) -> tuple[Concept, float]:
    """Textual Inversion on a concept set with default settings; returns (Concept, seconds)."""
    kwargs = {"steps": steps} if steps else {}
    config = TrainConfig(cs.token, init_text=cs.init_word, template=cs.template, seed=seed, **kwargs)
    t0 = time.time()
    last = {"t": t0}

    def on_event(event) -> None:
        if event.kind == "step" and time.time() - last["t"] > 30:
            last["t"] = time.time()
            progress(f"  {cs.name}: step {event.step}/{event.total} loss {event.loss:.4f}")
        elif event.kind in ("warning", "failed"):
            progress(f"  {cs.name}: {event.kind}: {event.message}")

    concept = Trainer(model, config, cs.images, out_dir).run(on_event)
    return concept, time.time() - t0


def evaluate_concept(model, judge: Judge, cs: BundledSet, cfg: EvalConfig, work_dir: Path,
                     progress: Progress = print) -> tuple[dict[str, Any], Concept]:
    """Train one concept with default settings and score it against its best plain prompt."""
    progress(f"training {cs.name} ({cs.kind}, init '{cs.init_word}') ...")
    loss_before = denoising_loss(model, cs, initial_concept(model, cs))
    concept, seconds = train_concept(model, cs, work_dir, cfg.train_steps, cfg.seed, progress)
    loss_after = denoising_loss(model, cs, concept)
    ti = score_subject(model, judge, cs, [concept], subject_phrases(cs, cs.token), cfg)
    plain = score_subject(model, judge, cs, [], subject_phrases(cs, None), cfg)
    result = {"kind": cs.kind, "token": cs.token, "init_word": cs.init_word, "best_prompt": cs.best_prompt,
              "train_seconds": round(seconds, 1), "train_steps": int(concept.meta.get("steps", 0)),
              "denoising_loss": {"initial_word": round(loss_before, 5), "trained": round(loss_after, 5)},
              "textual_inversion": ti, "plain_prompt": plain,
              "reconstruction_gain": round(ti["reconstruction"] - plain["reconstruction"], 4)}
    progress(f"  {cs.name}: reconstruction {ti['reconstruction']:.2f} (plain {plain['reconstruction']:.2f}), "
             f"editability {ti['editability']:.2f} (plain {plain['editability']:.2f}), trained in {seconds:.0f}s")
    return result, concept


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
    for a, b in itertools.combinations(objects, 2):
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
                   work_dir: Path | None = None, progress: Progress = print) -> dict[str, Any]:
    """Run every part of the evaluation on the model at `model_source` (None: the built-in demo) with the `judge`
    and `world` given, and return the results dict (what `studio eval --out` writes)."""
    cfg = cfg or EvalConfig()
    t0 = time.time()
    model = ModelManager().load(model_source)
    results = _about_the_run(model, judge, cfg)

    # 1. Does the base model listen to text, and how well does it follow prompts?
    results["conditioning_gap"] = conditioning_gap(model, world)
    progress(f"text conditioning: {results['conditioning_gap']}")
    if not cfg.skip_compliance:
        progress(f"prompt compliance over {cfg.prompts} captions ...")
        results["compliance"] = prompt_compliance(model, judge, world, cfg, progress)

    # 2. Concepts.
    if not cfg.skip_concepts:
        sets = world.concept_sets(cfg.concepts)
        work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="studio-eval-"))
        trained: dict[str, Concept] = {}
        results["concepts"] = {}
        for name, cs in sets.items():
            try:
                results["concepts"][name], trained[name] = evaluate_concept(model, judge, cs, cfg, work, progress)
            except (ValueError, TrainError) as exc:  # one unusable set must not cost the scores already taken
                results["concepts"][name] = {"kind": cs.kind, "error": str(exc)}
                progress(f"  {name}: skipped: {exc}")

        # 3. Style transfer, 4. composition.
        results["style_transfer"] = {n: style_transfer(model, judge, world, sets[n], trained[n], cfg)
                                     for n in trained if sets[n].kind == "style"}
        progress("composition ...")
        results["composition"] = composition(model, judge, sets, trained, cfg)
    results["seconds"] = round(time.time() - t0, 1)
    return results


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

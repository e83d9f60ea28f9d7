"""Scores read by a judge (studio.evaluation.world.Judge): the share of wanted attributes it sees in pictures.

The exact analogue, on a world whose ground truth is known, of the paper's CLIP similarities: reconstruction is the
share of a ground truth's attributes seen in "a photo of S*" pictures, prompt fidelity (the paper's editability)
the share of what each edit prompt asks for; an identity scorer, when there is one, adds DreamBench's identity
score. Every score comes with its bootstrap interval (studio/evaluation/stats.py).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np
from PIL import Image

from studio.engine.learned.word import Concept
from studio.evaluation.config import EvalConfig
from studio.evaluation.drawing import Draw, generate_pictures
from studio.evaluation.prompts import editing_prompts, reconstruction_prompts
from studio.evaluation.stats import hierarchical_bootstrap
from studio.evaluation.world import GroundTruth, IdentityScorer, Judge, SharedAttributes


def mean(values: Sequence[float]) -> float | None:
    """Rounded mean; None (JSON null) for no values rather than NaN, which JSON cannot hold."""
    return round(float(np.mean(values)), 4) if len(values) else None


def per_attribute(all_checks: list[dict[str, bool]]) -> dict[str, float]:
    """Mean of every check across pictures, keyed by attribute (`objects[1].color` counts as `color`)."""
    by_key: dict[str, list[bool]] = {}
    for checks in all_checks:
        for key, ok in checks.items():
            by_key.setdefault(key.split(".")[-1], []).append(ok)
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(by_key.items())}


def agreements(judge: Judge, images: Sequence[Image.Image],
               attributes: dict[str, Any]) -> tuple[list[float], list[dict[str, bool]]]:
    """Per picture: the share of `attributes` the judge sees (1.0 when none applies), and its checks."""
    checks = [judge.check(pred, attributes) for pred in judge.predict(images)]
    return [sum(c.values()) / len(c) if c else 1.0 for c in checks], checks


def agreement(judge: Judge, images: Sequence[Image.Image],
              attributes: dict[str, Any]) -> tuple[float | None, list[dict[str, bool]]]:
    """Mean agreement of `images` with `attributes`, and the per-picture checks."""
    shares, checks = agreements(judge, images, attributes)
    return mean(shares), checks


def color_spread(judge: Judge, images: Sequence[Image.Image]) -> dict[str, Any]:
    """Distinct colours and normalised entropy of the judged colours (1.0 = all the judge knows equally often)."""
    colors = [obj["color"] for pred in judge.predict(images) for obj in pred["objects"][:1]]
    counts = Counter(colors)
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0
    return {"distinct": len(counts), "entropy": round(entropy / math.log(judge.colors), 4),
            "colors": dict(counts.most_common())}


def score_subject(model, judge: Judge, cs: GroundTruth, concepts: Sequence[Concept], subject: str,
                  cfg: EvalConfig, draw: Draw | None = None, identity: IdentityScorer | None = None,
                  references: Sequence[Image.Image] = ()) -> dict[str, Any]:
    """Every score of one way of naming the concept (its token, or the plain words), each with its interval.

    - reconstruction: the judge's share of the concept's attributes in "a photo of S*" pictures;
    - prompt fidelity (the paper's editability, DreamBench's CLIP-T): the share of what each edit prompt names
      (background, position, size, style, count; for a style, the content), never the concept's own look;
    - attributes under edits (objects): the concept's attributes still seen in the edited pictures;
    - identity and identity under edits, when an `identity` scorer and the concept's `references` (its training
      pictures) are given: DreamBench's DINO score of the reconstruction and the edit pictures.

    `per_picture` keeps every score as prompts x pictures, so a run can pool subjects and pair margins
    (studio/evaluation/stats.py). `draw` makes the pictures (default: `generate_pictures` with `cfg`); the Evaluate
    tab passes one that reports progress, can be cancelled and keeps the pictures it shows.
    """
    draw = draw or (lambda prompt, used, n, seed: generate_pictures(model, prompt, used, n, seed, cfg))
    use_identity = identity is not None and len(references) > 0
    per_picture: dict[str, list[list[float]]] = {"reconstruction": [], "prompt_fidelity": []}
    if cs.kind != "style":
        per_picture["attributes_under_edits"] = []
    if use_identity:
        per_picture.update(identity=[], identity_under_edits=[])

    # 1. Reconstruction prompts: the concept and nothing else.
    recon_images, recon_checks = [], []
    for k, prompt in enumerate(reconstruction_prompts(cs, subject, cfg.prompt_limit)):
        images = draw(prompt, concepts, cfg.images, cfg.seed + 100 * k)
        shares, checks = agreements(judge, images, cs.attributes)
        per_picture["reconstruction"].append(shares)
        recon_checks += checks
        recon_images += images
        if use_identity:
            per_picture["identity"].append(identity.similarity(images, references))

    # 2. Editing prompts: the judge checks what the edit names; identity says whether the concept survived it.
    edit_scores = {}
    for k, (prompt, wanted) in enumerate(editing_prompts(cs, subject, cfg.prompt_limit)):
        images = draw(prompt, concepts, cfg.images, cfg.seed + 1000 + 100 * k)
        shares, _ = agreements(judge, images, wanted)
        per_picture["prompt_fidelity"].append(shares)
        edit_scores[prompt.replace(subject, "S*")] = estimate([shares], cfg)
        if cs.kind != "style" and "count" not in wanted:  # two of it is not one of it: no attributes to pair
            per_picture["attributes_under_edits"].append(agreements(judge, images, cs.attributes)[0])
        if use_identity:
            per_picture["identity_under_edits"].append(identity.similarity(images, references))

    out: dict[str, Any] = {name: estimate(values, cfg) for name, values in per_picture.items() if values}
    out.update(reconstruction_per_attribute=per_attribute(recon_checks), editing_prompts=edit_scores,
               per_picture={name: [[round(v, 4) for v in p] for p in values]
                            for name, values in per_picture.items() if values})
    if cs.kind == "diverse":
        out["color_spread"] = color_spread(judge, recon_images)
    return out


def estimate(per_prompt: list[list[float]], cfg: EvalConfig) -> dict[str, Any]:
    """One subject's prompts x pictures as a score with its interval (JSON form of stats.Estimate)."""
    return hierarchical_bootstrap([per_prompt], cfg.resamples, cfg.seed).as_dict()


def ground_truth_from_pictures(judge: Judge, pictures: Sequence[Image.Image], token: str,
                               kind: str) -> SharedAttributes | None:
    """What the judge reads alike in every training picture, as a ground truth to score against.

    Objects: the shape, colour and pattern of pictures holding one object (backgrounds vary and are not the
    concept); styles: the look (style, background) and a pattern every object shares. None when nothing is shared.
    """
    preds = judge.predict(list(pictures))
    if kind == "style":
        seen = [{"style": p["style"], "background": p["background"],
                 **({"pattern": p["objects"][0]["pattern"]}
                    if len({o["pattern"] for o in p["objects"]}) == 1 else {})} for p in preds]
    else:
        seen = [{k: p["objects"][0][k] for k in ("shape", "color", "pattern")} for p in preds if p["count"] == 1]
    shared = {k: v for k, v in seen[0].items() if all(s.get(k) == v for s in seen)} if seen else {}
    if not shared:
        return None
    return SharedAttributes(token, kind, shared)

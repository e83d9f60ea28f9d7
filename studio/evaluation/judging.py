"""Scores read by a judge (studio.evaluation.world.Judge): the share of wanted attributes it sees in pictures.

The exact analogue, on a world whose ground truth is known, of the paper's CLIP similarities: reconstruction is the
share of a ground truth's attributes seen in "a photo of S*" pictures, editability the share of what each edit
prompt asks for.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np
from PIL import Image

from studio.engine.concepts import Concept
from studio.evaluation.config import EvalConfig
from studio.evaluation.drawing import Draw, generate_pictures
from studio.evaluation.prompts import editing_prompts, reconstruction_prompts
from studio.evaluation.world import GroundTruth, Judge, SharedAttributes


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


def agreement(judge: Judge, images: Sequence[Image.Image],
              attributes: dict[str, Any]) -> tuple[float | None, list[dict[str, bool]]]:
    """Mean agreement of `images` with `attributes`, and the per-picture checks."""
    checks = [judge.check(pred, attributes) for pred in judge.predict(images)]
    return mean([sum(c.values()) / len(c) for c in checks]), checks


def color_spread(judge: Judge, images: Sequence[Image.Image]) -> dict[str, Any]:
    """Distinct colours and normalised entropy of the judged colours (1.0 = all the judge knows equally often)."""
    colors = [obj["color"] for pred in judge.predict(images) for obj in pred["objects"][:1]]
    counts = Counter(colors)
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0
    return {"distinct": len(counts), "entropy": round(entropy / math.log(judge.colors), 4),
            "colors": dict(counts.most_common())}


def score_subject(model, judge: Judge, cs: GroundTruth, concepts: Sequence[Concept], subject: str,
                  cfg: EvalConfig, draw: Draw | None = None) -> dict[str, Any]:
    """Reconstruction and editability for one way of naming the concept (its token, or the plain words).

    `draw` makes the pictures (default: `generate_pictures` with `cfg`); the Evaluate tab passes one that reports
    progress, can be cancelled and keeps the pictures it shows.
    """
    draw = draw or (lambda prompt, used, n, seed: generate_pictures(model, prompt, used, n, seed, cfg))
    recon_images = []
    for k, prompt in enumerate(reconstruction_prompts(cs, subject)):
        recon_images += draw(prompt, concepts, cfg.images, cfg.seed + 100 * k)
    reconstruction, recon_checks = agreement(judge, recon_images, cs.attributes)
    edit_scores, identity = {}, []
    for k, (prompt, wanted) in enumerate(editing_prompts(cs, subject)):
        images = draw(prompt, concepts, cfg.images, cfg.seed + 1000 + 100 * k)
        edit_scores[prompt.replace(subject, "S*")], _ = agreement(judge, images, wanted)
        if cs.kind != "style" and "count" not in wanted:  # does the concept survive the edit?
            identity.append(agreement(judge, images, cs.attributes)[0])
    out = {"reconstruction": reconstruction, "reconstruction_per_attribute": per_attribute(recon_checks),
           "editability": mean(list(edit_scores.values())), "editing_prompts": edit_scores}
    if identity:
        out["identity_under_edits"] = mean(identity)
    if cs.kind == "diverse":
        out["color_spread"] = color_spread(judge, recon_images)
    return out


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

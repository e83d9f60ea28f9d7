"""The evaluation run: it scores with the judge and world it is given (a stand-in pair on a tiny random model),
`studio eval` writes its JSON and keeps the scores already taken when a concept set cannot be trained, and a short
Textual Inversion run on the demo model brings a concept's generations nearer to its pictures than the untrained
initial word."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio.demo.concept_sets import CONCEPTS_DIR, load_concept_set
from studio.demo.evaluate import DemoWorld
from studio.demo.judge import Judge
from studio.engine.models import ModelManager
from studio.evaluation.config import EvalConfig
from studio.evaluation.denoising import conditioning_gap, denoising_loss, initial_concept
from studio.evaluation.drawing import generate_pictures
from studio.evaluation.prompts import reconstruction_prompts, subject_phrases
from studio.evaluation.runner import prompt_compliance, train_concept

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


class RedCircleJudge:
    """A stand-in judge that reads every picture as one red circle on white."""

    info = {"accuracy": {"shape": 1.0}}
    colors = 8

    def predict(self, images):
        return [{"count": 1, "background": "white", "style": "flat",
                 "objects": [{"shape": "circle", "color": "red", "pattern": "solid", "size": "big",
                              "position": "center"}]} for _ in images]

    def check(self, prediction, attributes):
        return {k: prediction["objects"][0].get(k, prediction.get(k)) == v for k, v in attributes.items()}

    def ground_truths(self):
        return []


class TwoCaptionWorld:
    """A stand-in world of two captions: one names what the judge reads, the other names none of it."""

    def captions(self, n, seed):
        return [("a red circle", {"shape": "circle", "color": "red"}),
                ("a blue square", {"shape": "square", "color": "blue"})][:n]


def test_compliance_is_scored_with_the_judge_and_world_it_is_given(tiny_model_dirs):
    """The runner imports no demo: what it reads comes from the objects passed in."""
    model = ModelManager().load(tiny_model_dirs["sd1"])
    result = prompt_compliance(model, RedCircleJudge(), TwoCaptionWorld(), EvalConfig(prompts=2, steps=1),
                               progress=lambda _m: None)
    assert result["per_attribute"] == {"color": 0.5, "shape": 0.5} and result["mean"] == 0.5
    assert result["all_named_right"] == 0.5 and result["chance_mean"] == 0.5  # each against the other's caption
    assert [e["prompt"] for e in result["examples"]] == ["a red circle", "a blue square"]


def test_eval_cli_writes_compliance_json(demo_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "studio", "eval", "--prompts", "3", "--steps", "2",
                           "--skip-concepts", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Base prompt compliance over 3 captions" in proc.stdout
    results = json.loads(out.read_text())
    assert results["compliance"]["prompts"] == 3
    assert {"count", "shape", "color"} <= set(results["compliance"]["per_attribute"])
    assert set(results["conditioning_gap"]) == {"loss_with_captions", "loss_with_empty_prompt", "relative_gap"}


def test_a_concept_set_that_cannot_be_trained_is_reported_and_the_other_scores_are_kept(demo_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "bad-init"
    shutil.copytree(CONCEPTS_DIR / "purple-star", folder)
    meta = json.loads((folder / "concept.json").read_text())
    meta["init_word"] = "night"  # not in the demo vocabulary: several byte tokens, so no vector to start from
    (folder / "concept.json").write_text(json.dumps(meta))
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "studio", "eval", "--prompts", "2", "--steps", "2", "--images", "1",
                           "--concepts", str(folder), "--out", str(out)], cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not evaluated: the initial word 'night'" in proc.stdout
    results = json.loads(out.read_text())
    assert results["compliance"]["prompts"] == 2  # the scores taken before the bad set survive
    (entry,) = results["concepts"].values()
    assert "tokens" in entry["error"] and entry["kind"] == "object"


def test_short_textual_inversion_beats_the_untrained_initial_word(demo_model_dir, tmp_path, judge):
    """120 seeded steps on the zigzag-ring set (a ring wearing the pattern no caption names): the trained word fits
    the pictures better than its initial word ("ring") by the training objective on fixed draws, and the judge
    finds its generations nearer the set (build 3: soft reconstruction 0.43 -> 0.73)."""
    torch.manual_seed(0)
    model = ModelManager().load(demo_model_dir)
    cs = load_concept_set("zigzag-ring")
    start = initial_concept(model, cs)
    trained, _seconds = train_concept(model, cs, tmp_path, steps=120, seed=0, progress=lambda _m: None)

    # 1. The objective itself, on noise/timesteps/prompts the run never drew.
    assert denoising_loss(model, cs, trained, seed=99) < denoising_loss(model, cs, start, seed=99)

    # 2. Reconstruction as the judge sees it (the continuous score: 8 pictures are enough to see it move).
    cfg = EvalConfig(steps=10)

    def reconstruction(concept) -> float:
        images = []
        for k, prompt in enumerate(reconstruction_prompts(cs, subject_phrases(cs, cs.token))):
            images += generate_pictures(model, prompt, [concept], 4, seed=100 * k, cfg=cfg)
        return judge.soft_agreement(images, cs.attributes)

    before, after = reconstruction(start), reconstruction(trained)
    gap = conditioning_gap(model, DemoWorld())
    if gap["relative_gap"] < 0.02 and after <= before + 0.02:
        pytest.xfail(f"the demo model ignores its prompts (denoising loss {gap['loss_with_captions']} with captions "
                     f"vs {gap['loss_with_empty_prompt']} without), so no word can steer it: reconstruction "
                     f"{before:.3f} -> {after:.3f}. Train the demo model longer (docs/demo-model.md).")
    assert after >= before + 0.02, (before, after)

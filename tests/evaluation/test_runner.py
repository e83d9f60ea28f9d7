"""The evaluation run: it scores with the judge, world and identity scorer it is given (stand-ins on a tiny random
model), every score with its interval and n, margins paired, subjects pooled; `studio eval` writes its JSON (base
compliance with intervals; a `--quick` DreamBench-shaped run on held-out individuals with identity) and keeps the
scores already taken when a concept set cannot be trained; `--methods` trains and scores every method alike; and a
short Textual Inversion run on the demo model brings a concept's generations nearer to its pictures than the
untrained initial word."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from studio.cli import main
from studio.demo.concept_sets import CONCEPTS_DIR, load_concept_set
from studio.demo.evaluate import DemoWorld
from studio.demo.judge import Judge
from studio.engine.models import ModelManager
from studio.evaluation.config import EvalConfig
from studio.evaluation.denoising import conditioning_gap, denoising_loss, initial_concept
from studio.evaluation.drawing import generate_pictures
from studio.evaluation.prompts import reconstruction_prompts, subject_phrases
from studio.evaluation.report import format_table
from studio.evaluation.runner import prompt_compliance, run_evaluation, train_concept

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
    # Intervals over the 2 captions: one is all right, one all wrong, so resampling spans 0 .. 1.
    assert result["mean_ci"] == {"mean": 0.5, "low": 0.0, "high": 1.0, "n": 2}
    assert result["per_attribute_ci"]["color"] == {"mean": 0.5, "low": 0.0, "high": 1.0, "n": 2}
    assert result["all_named_right"] == 0.5 and result["chance_mean"] == 0.5  # each against the other's caption
    assert [e["prompt"] for e in result["examples"]] == ["a red circle", "a blue square"]


class SquaresIdentity:
    """A stand-in identity scorer: cosine of colour histograms (same colours in the same shares: 1)."""

    info = {"quality": {"kind": "colour histogram"}}

    @staticmethod
    def _hist(image):
        arr = np.asarray(image.convert("RGB").resize((32, 32))) // 64
        h = np.bincount((arr[..., 0] * 16 + arr[..., 1] * 4 + arr[..., 2]).ravel(), minlength=64).astype(float)
        return h / np.linalg.norm(h)

    def similarity(self, generated, references):
        refs = np.stack([self._hist(r) for r in references])
        return [float((refs @ self._hist(g)).mean()) for g in generated]

    def cross_similarity(self, references):
        h = np.stack([self._hist(r) for r in references])
        sims = h @ h.T
        return list((sims.sum(1) - 1.0) / (len(references) - 1))


class HeldOutSquaresWorld(TwoCaptionWorld):
    """A stand-in world whose held-out subjects are coloured squares (3 pictures each, written as concept sets)."""

    def captioned_pictures(self, n, seed, size):
        return [(Image.new("RGB", (size, size), (200, 40, 40)), "a red circle") for _ in range(n)]

    def concept_sets(self, names):
        raise AssertionError("with held-out subjects and no --concepts, no bundled set is asked for")

    def held_out_sets(self, n, seed, folder):
        sets = {}
        for k in range(n):
            pictures = folder / f"square-{k}"
            pictures.mkdir(parents=True)
            for j in range(3):
                arr = np.full((32, 32, 3), 240, np.uint8)
                arr[4 + j:20 + j, 6:22] = (40 * k + 60, 80, 200 - 40 * k)
                Image.fromarray(arr).save(pictures / f"{j}.png")
            sets[f"square-{k}"] = SimpleNamespace(
                name=f"square-{k}", kind="object", token=f"<square-{k}>", init_word="toy", template="object",
                attributes={"shape": "circle", "color": "red"}, plain_subject="red toy", best_prompt="a red toy",
                images=sorted(pictures.glob("*.png")))
        return sets

    def identity(self):
        return SquaresIdentity()


def test_a_held_out_run_scores_identity_with_intervals_pairs_margins_and_pools_subjects(tiny_model_dirs, tmp_path):
    """2 subjects x (2 reconstruction + 2 edit prompts) x 1 picture, `quick`: every score carries n and an interval,
    the judge's reconstruction margin (both sides read alike by the stand-in judge) is exactly 0 ± 0, identity has
    its real-pictures ceiling, and the table prints them as `mean ± half-width (n=...)`."""
    cfg = EvalConfig(held_out=2).quick()
    results = run_evaluation(str(tiny_model_dirs["sd1"]), RedCircleJudge(), HeldOutSquaresWorld(), cfg, tmp_path,
                             progress=lambda _m: None)
    json.dumps(results)  # what --out writes
    assert set(results["concepts"]) == {"square-0", "square-1"}
    one = results["concepts"]["square-0"]
    assert one["held_out"] and one["margins"]["reconstruction"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 2}
    ti = one["textual_inversion"]
    assert {"reconstruction", "identity", "prompt_fidelity", "identity_under_edits"} <= set(ti)
    assert ti["identity"]["n"] == 2 and -1 <= ti["identity"]["low"] <= ti["identity"]["mean"] <= ti["identity"]["high"]
    assert one["ceiling"]["identity"]["n"] == 3 and 0 < one["ceiling"]["identity"]["mean"] <= 1
    pooled = results["pooled"]["held_out"]
    assert pooled["subjects"] == ["square-0", "square-1"] and "given" not in results["pooled"]
    assert pooled["textual_inversion"]["identity"]["n"] == 4  # 2 subjects x 2 prompts x 1 picture
    assert pooled["textual_inversion"]["prompt_fidelity"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 4}
    assert pooled["margins"]["identity"]["low"] <= pooled["margins"]["identity"]["mean"]
    assert pooled["ceiling"]["n"] == 6 and "identity_of_ceiling" in pooled
    table = format_table(results)
    assert "Pooled over 2 held-out subjects" in table and "real pictures (the ceiling)" in table
    assert "+0.00 ± 0.00 (n=2)" in table and "(n=4)" in table


def test_every_method_is_trained_and_scored_alike_and_pooled_with_its_margin_over_ti(tiny_model_dirs, tmp_path):
    """`methods`: each method trained on the same 2 held-out subjects, scored on the same prompts and seeds (the
    stand-in judge reads every picture alike, so each margin over TI is exactly 0 ± 0), TI's scores reused from the
    concepts part rather than trained again, and each result's size the size of what it wrote."""
    cfg = EvalConfig(held_out=2).quick()
    methods = ("ti", "pivotal", "lora", "dreambooth")
    results = run_evaluation(str(tiny_model_dirs["sd1"]), RedCircleJudge(), HeldOutSquaresWorld(), cfg, tmp_path,
                             progress=lambda _m: None, methods=methods)
    json.dumps(results)
    assert list(results["methods"]) == list(methods)
    ti = results["methods"]["ti"]
    assert ti["concepts"]["square-0"]["per_picture"] == results["concepts"]["square-0"]["textual_inversion"]["per_picture"]
    assert not (tmp_path / "methods" / "ti").exists()  # not trained twice
    for name in methods:
        m = results["methods"][name]
        assert m["subjects"] == ["square-0", "square-1"]
        assert m["identity"]["n"] == 4 and m["identity"]["low"] <= m["identity"]["mean"] <= m["identity"]["high"]
        assert m["prompt_fidelity"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 4}
        assert m["train_seconds"] > 0 and 1 <= m["train_steps"] <= 20  # --quick: 20 at most
        if name != "ti":
            assert m["vs_ti"]["prompt_fidelity"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 4}
            one = m["concepts"]["square-0"]
            written = Path(one["path"])
            assert written.is_relative_to(tmp_path / "methods" / name)
            on_disk = (sum(f.stat().st_size for f in written.rglob("*") if f.is_file()) if written.is_dir() else
                       sum(f.stat().st_size for f in written.parent.glob(written.stem + "*.safetensors")))
            assert one["file_bytes"] == on_disk
    lora, dreambooth = results["methods"]["lora"]["concepts"]["square-0"], results["methods"]["dreambooth"]
    assert lora["subject"] == "<square-0> toy" and results["methods"]["pivotal"]["concepts"]["square-0"]["subject"] \
        == "<square-0>"
    assert Path(dreambooth["concepts"]["square-0"]["path"]).name == "square-0"  # one model folder per subject
    assert ti["file_bytes"] < lora["file_bytes"] < dreambooth["file_bytes"]
    table = format_table(results)
    assert "Training methods on the same sets" in table and "identity − TI" in table
    assert all(f"\n  {name} " in table for name in methods)


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
    ci = results["compliance"]["mean_ci"]
    assert ci["n"] == 3 and ci["low"] <= results["compliance"]["mean"] <= ci["high"]
    assert set(results["compliance"]["per_attribute_ci"]) == set(results["compliance"]["per_attribute"])
    assert set(results["conditioning_gap"]) == {"loss_with_captions", "loss_with_empty_prompt", "relative_gap"}


def test_a_quick_held_out_run_measures_identity_against_its_ceiling_with_intervals(demo_model_dir, tmp_path):
    """`studio eval --held-out 2 --quick`: two individuals no model has seen are written into the work dir, trained
    and scored on both sides by the judge and the identity encoder; the pooled table has n = 2 x 2 x 1 pictures."""
    from studio.demo.evaluate import DemoJudge

    try:
        DemoJudge().info, DemoWorld().identity()
    except ValueError as exc:  # JudgeError / IdentityError: not trained for world v2 yet
        pytest.skip(f"needs the world v2 judge and identity encoder: {exc}")
    out, work = tmp_path / "eval.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "studio", "eval", "--held-out", "2", "--quick", "--skip-compliance",
                           "--work-dir", str(work), "--out", str(out)], cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert len(results["concepts"]) == 2 and all(r["held_out"] for r in results["concepts"].values())
    assert sorted(p.name for p in (work / "held-out").iterdir()) == sorted(results["concepts"])
    pooled = results["pooled"]["held_out"]
    for side in ("textual_inversion", "plain_prompt"):
        identity = pooled[side]["identity"]
        assert identity["n"] == 4 and -1 <= identity["low"] <= identity["mean"] <= identity["high"] <= 1
    assert pooled["margins"]["identity"]["n"] == 4 and pooled["ceiling"]["n"] >= 2 * 4  # 2 subjects' pictures
    assert "Pooled over 2 held-out subjects" in proc.stdout and "real pictures (the ceiling)" in proc.stdout


def test_a_quick_methods_run_on_the_demo_model_reports_each_method(demo_model_dir, tmp_path):
    """`studio eval --concepts purple-star --quick --methods ti,lora`: both methods trained (20 steps) and scored on
    the set, the table printed and the JSON's `methods` holding each one's scores with intervals, size and time."""
    out, work = tmp_path / "eval.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "studio", "eval", "--concepts", "purple-star", "--quick",
                           "--skip-compliance", "--methods", "ti,lora", "--work-dir", str(work), "--out", str(out)],
                          cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    methods = json.loads(out.read_text())["methods"]
    assert list(methods) == ["ti", "lora"]
    for name, m in methods.items():
        for measure in ("prompt_fidelity", "reconstruction"):
            assert m[measure]["n"] == 2 and 0 <= m[measure]["low"] <= m[measure]["mean"] <= m[measure]["high"] <= 1
        assert m["file_bytes"] > 0 and m["train_seconds"] > 0
    assert (work / "methods" / "lora" / "purple-star.safetensors").stat().st_size == methods["lora"]["file_bytes"]
    assert methods["lora"]["vs_ti"]["prompt_fidelity"]["n"] == 2
    assert "Training methods on the same sets" in proc.stdout and "\n  lora " in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "studio", "eval", "--methods", "ti,textual"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown method textual" in bad.stderr


def test_a_quick_variants_run_draws_the_papers_chart(demo_model_dir, tmp_path, capsys):
    """`studio eval --held-out 1 --quick --variants ti,xti,progressive --chart FILE.png`: each variant trained and
    scored on the held-out subject (identity with its interval), the PNG written; --chart alone is refused."""
    out, chart = tmp_path / "eval.json", tmp_path / "chart.png"
    proc = subprocess.run([sys.executable, "-m", "studio", "eval", "--held-out", "1", "--quick", "--skip-compliance",
                           "--variants", "ti,xti,progressive", "--chart", str(chart), "--work-dir",
                           str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert list(results["variants"]) == ["ti", "xti", "progressive"]
    for row in results["variants"].values():
        assert row["identity"]["low"] <= row["identity"]["mean"] <= row["identity"]["high"]
    assert results["variants"]["xti"]["concepts"]  # trained per set
    assert Image.open(chart).size == (900, 640) and results["chart"] == str(chart)
    assert main(["eval", "--chart", str(tmp_path / "x.png")]) == 2
    assert "--chart draws the methods or variants" in capsys.readouterr().err


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

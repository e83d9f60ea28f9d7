"""The evaluation: what a caption names is scored right, the bundled concept sets are what their ground truth
says (and what plain words cannot name), the CLI writes its JSON, and a short Textual Inversion run on the demo
model brings a concept's generations nearer to its pictures than the untrained initial word."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.demo import world
from studio.demo.concept_sets import CONCEPTS_DIR, build_concept_sets, list_concept_sets, load_concept_set
from studio.demo.evaluate import caption_attributes, conditioning_gap, denoising_loss, initial_concept, train_concept
from studio.demo.judge import Judge, check
from studio.demo.vocab import demo_words

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


def test_caption_attributes_are_named_in_the_caption_true_of_the_scene_and_judged_right_on_clean_renders(judge):
    """Compliance scoring: a perfect generation (the scene's own render) scores ~1 against what its caption names."""
    rng = random.Random(5)
    scores, named_keys = [], set()
    for _ in range(300):
        scene = world.sample_scene(rng, training=True)
        text = world.caption(scene, rng)
        named = caption_attributes(scene, text)
        objects = named.get("objects", [{k: v for k, v in named.items() if k in ("shape", "color", "pattern",
                                                                                   "size", "position")}])
        for spec, obj in zip(objects, scene.objects):
            for key, value in spec.items():
                assert getattr(obj, key) == value and value in text.split() + text.replace(",", "").split()
                named_keys.add(key)
        checks = check(judge.predict([world.render(scene)])[0], named)
        scores.append(sum(checks.values()) / len(checks))
    assert named_keys == {"shape", "color", "pattern", "size", "position"}
    assert np.mean(scores) >= 0.95


def test_bundled_concept_sets_show_their_ground_truth_and_plain_words_cannot_name_them(judge):
    names = list_concept_sets()
    sets = [load_concept_set(n) for n in names]
    kinds = [s.kind for s in sets]
    assert kinds.count("object") >= 3 and kinds.count("style") >= 2 and kinds.count("diverse") >= 1
    vocabulary = set(demo_words())
    for cs in sets:
        assert 4 <= len(cs.images) <= 6, cs.name
        pictures = [Image.open(p) for p in cs.images]
        assert all(p.size == (64, 64) and p.mode == "RGB" for p in pictures)
        assert judge.mean_agreement(pictures, cs.attributes) >= 0.9, cs.name
        assert cs.init_word in vocabulary and set(cs.best_prompt.split()) <= vocabulary
        if cs.kind in ("object", "style"):  # a held-out (shape, colour) pair, or the unnamed pattern
            unreachable = cs.attributes.get("pattern") in world.UNNAMED["pattern"] or \
                (cs.attributes.get("shape"), cs.attributes.get("color")) in world.TRAINING_EXCLUDED
            assert unreachable, f"{cs.name}: a plain prompt could name it"
    assert "zigzag" not in vocabulary


def test_concept_sets_regenerate_bit_for_bit(tmp_path):
    """The committed PNGs are exactly what the seeded script draws."""
    build_concept_sets(tmp_path)
    for name in list_concept_sets():
        for png in sorted((CONCEPTS_DIR / name).glob("*.png")):
            assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / name / png.name)))
        committed = json.loads((CONCEPTS_DIR / name / "concept.json").read_text())
        assert committed == json.loads((tmp_path / name / "concept.json").read_text())


def test_unknown_concept_set_lists_the_bundled_ones():
    with pytest.raises(ValueError, match="purple-star"):
        load_concept_set("no-such-set")


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
    import torch

    from studio.demo.evaluate import EvalConfig, _generate, reconstruction_prompts, subject_phrases
    from studio.engine.models import ModelManager

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
            images += _generate(model, prompt, [concept], 4, seed=100 * k, cfg=cfg)
        return judge.soft_agreement(images, cs.attributes)

    before, after = reconstruction(start), reconstruction(trained)
    gap = conditioning_gap(model)
    if gap["relative_gap"] < 0.02 and after <= before + 0.02:
        pytest.xfail(f"the demo model ignores its prompts (denoising loss {gap['loss_with_captions']} with captions "
                     f"vs {gap['loss_with_empty_prompt']} without), so no word can steer it: reconstruction "
                     f"{before:.3f} -> {after:.3f}. Train the demo model longer (docs/demo-model.md).")
    assert after >= before + 0.02, (before, after)

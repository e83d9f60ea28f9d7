"""Concept scoring with CLIP on a model that is not the demo: a tiny random CLIPModel saved to a folder and loaded
back the way a user's hub id or folder is; identical pictures score image-image similarity 1.0 and different ones
less; a whole evaluation gives finite scores for the word and the plain words, with progress, and can be cancelled;
with nothing to score against, the error says what to configure."""

import dataclasses
import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

from benchmarks.architectures import TINY_WORDS
from studio.demo.concept_sets import load_concept_set
from studio.demo.evaluate import DemoJudge
from studio.demo.tokenizer import build_clip_tokenizer
from studio.engine.generate import Cancelled
from studio.engine.learned.word import Concept
from studio.engine.models import ModelManager
from studio.evaluation.clip import ClipScorer
from studio.evaluation.config import ScoreConfig, ScoringError
from studio.evaluation.judging import ground_truth_from_pictures
from studio.evaluation.prompts import without_subject
from studio.evaluation.scoring import score_concept


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIP (1 layer, width 32, 32x32 pictures) with its processor, saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_clip_tokenizer(TINY_WORDS, folder)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.eos_token_id)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, max_position_embeddings=77, **ids)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)) \
        .save_pretrained(folder)
    pictures = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=pictures, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd1(tiny_model_dirs):
    return ModelManager().load(tiny_model_dirs["sd1"])


def square(color) -> Image.Image:
    arr = np.full((48, 48, 3), 240, np.uint8)
    arr[10:38, 10:38] = color
    return Image.fromarray(arr)


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8))


def concept_for(model) -> Concept:
    torch.manual_seed(0)
    return Concept("<toy>", {"text_encoder": torch.randn(1, model.encoder_dims["text_encoder"])}, {"init_text": "toy"})


def test_identical_pictures_have_image_similarity_one_and_different_ones_less(clip_dir):
    clip = ClipScorer.load(clip_dir)
    pictures = [square((40, 60, 200)), noise(1)]
    assert clip.image_similarity(pictures[:1], pictures[:1]) == pytest.approx(1.0, abs=1e-5)
    assert clip.image_similarity([noise(2)], [noise(2)]) == pytest.approx(1.0, abs=1e-5)
    different = clip.image_similarity(pictures[:1], pictures[1:])
    assert math.isfinite(different) and different < 0.999
    # The mean over pairs: a picture against itself and another lies between the two.
    assert different < clip.image_similarity(pictures[:1], pictures) < 1.0
    assert math.isfinite(clip.text_similarity(pictures, ["a photo of a blue toy", "a red cat on the beach"]))


def test_clip_scores_the_word_and_the_plain_words_on_a_real_model_with_progress(sd1, clip_dir):
    seen = []
    scores = score_concept(sd1, concept_for(sd1), ScoreConfig(samples=1, steps=2),
                           reference_images=[square((40, 60, 200)), square((40, 100, 200))], clip=str(clip_dir),
                           on_progress=lambda done, total, prompt: seen.append((done, total, prompt)))
    assert scores.scorers == ["clip"] and scores.plain_words == "toy" and scores.ground_truth is None
    for measure in ("CLIP image-image", "CLIP image-text"):
        for plain in (False, True):
            value = scores.score(measure, plain=plain)
            assert value is not None and math.isfinite(value) and -1.0 <= value <= 1.0, (measure, plain)
    image = scores.estimate("CLIP image-image")
    assert image.n == 2 and image.low <= image.mean <= image.high  # 2 reconstruction prompts x 1 picture
    assert scores.lines[0].margin is not None and scores.lines[0].margin.n == 2  # paired by prompt and seed
    # 2 reconstruction + 4 edit prompts, for the word and for the plain words, one picture each.
    assert len(scores.samples) == 12 and scores.notes == []
    assert [s.prompt for s in scores.samples][:2] == ["a photo of a <toy>", "a rendering of a <toy>"]
    assert {s.role for s in scores.samples} == {"reconstruction", "editing"}
    assert seen[-1][:2] == (24, 24) and [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)


def test_without_training_pictures_only_text_similarity_is_measured_and_the_note_says_why(sd1, clip_dir):
    scores = score_concept(sd1, concept_for(sd1), ScoreConfig(samples=1, steps=1, plain_words="a cat"),
                           clip=ClipScorer.load(clip_dir))
    assert [line.measure for line in scores.lines] == ["CLIP image-text"] and scores.plain_words == "a cat"
    assert scores.notes == ["no CLIP image-image similarity: give the pictures the concept was trained on"]


def test_the_prompt_without_the_word_is_what_edited_pictures_are_compared_with():
    assert without_subject("a photo of a <toy> on the beach", "<toy>") == "a photo of a on the beach"
    assert without_subject("a dog in the style of <s>", "in the style of <s>") == "a dog"


def test_cancel_stops_the_evaluation(sd1, clip_dir):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        score_concept(sd1, concept_for(sd1), ScoreConfig(samples=1, steps=1), clip=str(clip_dir), cancel=cancel)


def test_nothing_to_score_with_says_what_to_configure(sd1):
    with pytest.raises(ScoringError, match="needs a CLIP model.*hub id.*folder"):
        score_concept(sd1, concept_for(sd1), ScoreConfig(samples=1, steps=1), judge=DemoJudge())  # not the demo
    demo_like = dataclasses.replace(sd1, is_demo=True)  # the demo model, but no concept set to judge against
    with pytest.raises(ScoringError, match="no ground truth.*purple-star"):
        score_concept(demo_like, concept_for(sd1), ScoreConfig(samples=1, steps=1), judge=DemoJudge())
    with pytest.raises(ScoringError, match="could not load the CLIP model"):
        ClipScorer.load("/no/such/clip-folder")
    with pytest.raises(ScoringError, match="samples must be between 1 and 16"):
        ScoreConfig(samples=0)


def test_the_judge_reads_the_ground_truth_that_every_training_picture_shares():
    """A demo-model concept trained on the user's own pictures is judged against what those pictures share."""
    def pictures(name):
        return [Image.open(p) for p in load_concept_set(name).images]

    judge = DemoJudge()
    stars = ground_truth_from_pictures(judge, pictures("purple-star"), "<mine>", "object")
    assert stars.attributes == {"shape": "star", "color": "purple", "pattern": "solid"} and stars.token == "<mine>"
    look = ground_truth_from_pictures(judge, pictures("zigzag-soft"), "<look>", "style")
    assert look.attributes == {"style": "soft", "background": "beige", "pattern": "zigzag"} and look.kind == "style"
    mixed = ground_truth_from_pictures(judge, pictures("purple-star")[:2] + pictures("dotted-cyan-heart")[:2], "<x>",
                                       "object")
    assert mixed is None  # star/heart, purple/cyan, solid/dotted: nothing is shared

"""An image concept's place in a request's plan (studio.engine.learned.image_prompt.ImageConcept.join), no model:
its word becomes its prompt text in the prompt and the negative prompt alike (at any weight), and a quick-tuned
concept's word keeps the token for its vectors instead."""

from __future__ import annotations

import torch

from studio.engine.learned.image_prompt import ImageConcept
from studio.engine.learned.plan import Use, plan_request
from studio.engine.learned.word import Concept


def _concept(word=None) -> ImageConcept:
    return ImageConcept("<dog>", torch.ones(2, 4), torch.zeros(2, 4), "demo", prompt_text="dog", word=word)


def test_the_word_is_replaced_in_the_negative_prompt_too():
    for weight in (1.0, 0.0):
        plan = plan_request("a photo of <dog>, sharp", "blurry <dog>, <dog>s", [Use(_concept(), weight)])
        assert (plan.prompt, plan.negative_prompt) == ("a photo of dog, sharp", "blurry dog, <dog>s")
        assert bool(plan.patches) == (weight != 0)  # weight 0: no adapter, the text still replaced


def test_a_quick_tuned_concept_keeps_its_token_for_its_word():
    word = Concept("<dog>", {"text_encoder": torch.zeros(1, 4)}, {})
    plan = plan_request("a photo of <dog>", "blurry <dog>", [Use(_concept(word), 0.0)])
    assert (plan.prompt, plan.negative_prompt) == ("a photo of <dog>", "blurry <dog>") and plan.words == [word]

"""Prompt encoding with per-request concepts equals diffusers' load_textual_inversion, without mutating anything."""

import threading

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word import Concept, ConceptMismatchError
from studio.engine.prompts import PromptEncoder


def _load(dirs, family):
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(dirs[family])


def _concept(token, pipe, n, seed):
    g = torch.Generator().manual_seed(seed)
    vecs = {"text_encoder": torch.randn(n, pipe.text_encoder.config.hidden_size, generator=g) * 0.02}
    if getattr(pipe, "text_encoder_2", None) is not None:
        vecs["text_encoder_2"] = torch.randn(n, pipe.text_encoder_2.config.hidden_size, generator=g) * 0.02
    return Concept(token, vecs, {})


def _diffusers_load(pipe, concept):
    pipe.load_textual_inversion(concept.vectors["text_encoder"], token=concept.token,
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    if "text_encoder_2" in concept.vectors:
        pipe.load_textual_inversion(concept.vectors["text_encoder_2"], token=concept.token,
                                    text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_embeddings_equal_diffusers_load_textual_inversion(tiny_model_dirs, family):
    ours_pipe, ref_pipe = _load(tiny_model_dirs, family), _load(tiny_model_dirs, family)
    cat = _concept("<cat-toy>", ours_pipe, 3, 1)
    style = _concept("<ink>", ours_pipe, 1, 2)
    prompt, negative = "a photo of <cat-toy> on the beach in the style of <ink>", "blurry <cat-toy>"
    ours = PromptEncoder.from_pipeline(ours_pipe).pipeline_kwargs(prompt, negative, [cat, style], 1, 7.5)
    if family == "sdxl":  # the tiny SDXL pipeline shares one tokenizer object; diffusers needs two
        import copy
        ref_pipe.tokenizer_2 = copy.deepcopy(ref_pipe.tokenizer)
    _diffusers_load(ref_pipe, cat)
    _diffusers_load(ref_pipe, style)
    with torch.no_grad():
        ref = ref_pipe.encode_prompt(prompt=prompt, negative_prompt=negative, device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=True, **({"prompt_2": None} if family == "sdxl" else {}))
    assert torch.allclose(ours["prompt_embeds"], ref[0], atol=1e-5, rtol=0)
    assert torch.allclose(ours["negative_prompt_embeds"], ref[1], atol=1e-5, rtol=0)
    if family == "sdxl":
        assert torch.allclose(ours["pooled_prompt_embeds"], ref[2], atol=1e-5, rtol=0)
        assert torch.allclose(ours["negative_pooled_prompt_embeds"], ref[3], atol=1e-5, rtol=0)


def test_no_concept_prompt_equals_plain_pipeline_and_nothing_is_mutated(tiny_model_dirs):
    pipe = _load(tiny_model_dirs, "sd1")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    n_tokens = len(pipe.tokenizer)
    enc = PromptEncoder.from_pipeline(pipe)
    ours = enc.encode(["a red cat on the beach"]).embeds
    enc.encode(["a <x> cat"], [_concept("<x>", pipe, 2, 3)])
    with torch.no_grad():
        ref = pipe.encode_prompt("a red cat on the beach", "cpu", 1, False)[0]
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert len(pipe.tokenizer) == n_tokens
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)


def test_gradients_reach_only_the_concept_vectors(tiny_model_dirs):
    pipe = _load(tiny_model_dirs, "sd1")
    pipe.text_encoder.requires_grad_(False)  # frozen, as in training
    vec = torch.zeros(2, 768, requires_grad=True)
    concept = Concept("<v>", {"text_encoder": vec}, {})
    PromptEncoder.from_pipeline(pipe).encode(["a photo of <v>"], [concept]).embeds.square().sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
    # A vector sitting in an unused slot (after truncation) would get no gradient: the slot really is used.
    assert (vec.grad.abs().sum(dim=1) > 0).all()


def test_two_threads_with_different_concepts_get_their_own_embeddings(tiny_model_dirs):
    pipe = _load(tiny_model_dirs, "sd1")
    enc = PromptEncoder.from_pipeline(pipe)
    a, b = _concept("<s>", pipe, 1, 10), _concept("<s>", pipe, 1, 11)
    expected = {name: enc.encode(["a photo of <s>"], [c]).embeds for name, c in (("a", a), ("b", b))}
    results, errors = {}, []

    def work(name, concept):
        try:
            for _ in range(5):
                out = enc.encode(["a photo of <s>"], [concept]).embeds
                assert torch.equal(out, expected[name])
            results[name] = True
        except AssertionError as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n, c)) for n, c in (("a", a), ("b", b))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and results == {"a": True, "b": True}
    assert not torch.equal(expected["a"], expected["b"])


# ---- a concept that does not fit the model -------------------------------------------------------------------------

def _concept_file(tmp_path, name, dims):
    """A real concept file on disk, read back the way the studio reads user files."""
    g = torch.Generator().manual_seed(7)
    concept = Concept(name, {key: torch.randn(2, dim, generator=g) for key, dim in dims.items()}, {})
    return load_concept(save_concept(concept, tmp_path / name))


@pytest.mark.parametrize("family, file_dims, expected", [
    ("sd2", {"text_encoder": 768}, ["768-d", "1024-d", "SD 1.x", "SD 2.x"]),  # SD1 file on an SD2 model
    ("sd1", {"text_encoder": 1024}, ["1024-d", "768-d", "SD 2.x", "SD 1.x"]),  # SD2 file on an SD1 model
    ("sdxl", {"text_encoder": 768}, ["768-d", "768-d + 1280-d", "SDXL", "text_encoder_2 (clip_g)"]),  # no 2nd half
    ("sd1", {"text_encoder": 768, "text_encoder_2": 1280}, ["768-d + 1280-d", "SDXL", "SD 1.x"]),  # SDXL file on SD1
])
def test_concept_for_another_family_raises_mismatch_error_naming_file_and_sizes(tiny_model_dirs, tmp_path, family,
                                                                                file_dims, expected):
    """Guards against a bare KeyError / shape error from deep inside encoding when a file is for another model."""
    pipe = _load(tiny_model_dirs, family)
    concept = _concept_file(tmp_path, "wrong-model", file_dims)
    enc = PromptEncoder.from_pipeline(pipe)
    for call in (lambda: enc.encode(["a photo of wrong-model"], [concept]),
                 lambda: enc.pipeline_kwargs("a photo of wrong-model", "", [concept], 1, 7.5)):
        with pytest.raises(ConceptMismatchError) as info:
            call()
        message = str(info.value)
        assert "wrong-model.safetensors" in message and "'wrong-model'" in message
        for part in expected:
            assert part in message, (part, message)
        assert "To use it, load" in message and "or pick a concept trained for" in message


def test_concept_that_fits_passes_the_check(tiny_model_dirs, tmp_path):
    pipe = _load(tiny_model_dirs, "sdxl")
    concept = _concept_file(tmp_path, "right-model", {"text_encoder": 768, "text_encoder_2": 1280})
    enc = PromptEncoder.from_pipeline(pipe)
    assert enc.encoder_dims == {"text_encoder": 768, "text_encoder_2": 1280}
    assert enc.encode(["a photo of right-model"], [concept]).embeds.shape == (1, 77, 768 + 1280)


# ---- attention mask, for text encoders that ask for it -------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_attention_mask_is_used_when_the_encoder_config_asks_for_it(tiny_model_dirs, family):
    """With `use_attention_mask` set, diffusers' encode_prompt hides the padding; so must we (1e-5)."""
    ours_pipe, ref_pipe = _load(tiny_model_dirs, family), _load(tiny_model_dirs, family)
    prompt = "a photo of <cat-toy> on the beach"
    cat = _concept("<cat-toy>", ours_pipe, 2, 4)
    enc = PromptEncoder.from_pipeline(ours_pipe)
    unmasked = enc.encode([prompt], [cat]).embeds
    ours_pipe.text_encoder.config.use_attention_mask = True
    ref_pipe.text_encoder.config.use_attention_mask = True
    masked = enc.encode([prompt], [cat]).embeds
    _diffusers_load(ref_pipe, cat)
    with torch.no_grad():
        ref = ref_pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.allclose(masked, ref, atol=1e-5, rtol=0)
    # The mask really changes something (the padding positions), so this test can fail.
    assert (masked - unmasked).abs().max() > 1e-3


def test_split_concept_words_is_whole_words_longest_first():
    """The one rule for concept words (the library and the encoder both use it): whole words, next to prompt syntax
    or sentence punctuation, never inside a longer word; the longest known word at a place wins."""
    from studio.engine.prompts import split_concept_words

    known = {t: Concept(t, {"text_encoder": torch.zeros(1, 8)}) for t in ("<cat-toy>", "<a>", "<a>b", "SD1.5-Hair")}

    def words(prompt):
        return [p.token if isinstance(p, Concept) else p for p in split_concept_words(prompt, known.get)]

    assert words("a <cat-toy>.") == ["a ", "<cat-toy>", "."]
    assert words("(<cat-toy>:1.2), [SD1.5-Hair|x]") == ["(", "<cat-toy>", ":1.2), [", "SD1.5-Hair", "|x]"]
    assert words("<a>b <a>'s") == ["", "<a>b", " ", "<a>", "'s"]
    assert words("<cat-toy>s x<a> <a><a> bad") == ["<cat-toy>s x<a> <a><a> bad"]
    assert words("") == [""]


# ---- LoRA tags (A1111's `<lora:name:weight>`) ------------------------------------------------------------------


def test_split_lora_tags_takes_tags_out_with_their_weights_default_1():
    from studio.engine.prompts import split_lora_tags

    assert split_lora_tags("a photo of <lora:pixel_art:0.8> a cat, <lora:ink>") == (
        "a photo of a cat,", [("pixel_art", 0.8), ("ink", 1.0)])
    assert split_lora_tags("<lora:x:-0.5>dog") == ("dog", [("x", -0.5)])


def test_a_prompt_without_lora_tags_is_returned_exactly_as_written():
    """Guards generation without LoRA: its prompt (double spaces and all) must reach the encoder unchanged."""
    from studio.engine.prompts import split_lora_tags

    prompt = "  a  cat <cat-toy> (red:1.2)  "
    assert split_lora_tags(prompt) == (prompt, [])


def test_a_malformed_lora_weight_is_one_clear_error():
    from studio.engine.prompts import split_lora_tags
    from studio.errors import UserError

    with pytest.raises(UserError, match=r"<lora:ink:abc>: the LoRA weight 'abc' is not a number; write <lora:ink:0.8>"):
        split_lora_tags("a cat <lora:ink:abc>")

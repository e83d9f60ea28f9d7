"""SD3 and Flux: tiny random pipelines (benchmarks/architectures.py) saved and loaded back offline; their family
records, loading through ModelManager and drawing through `generate`."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from benchmarks.architectures import T5_WIDTH, build_random_pipeline


def test_tiny_flow_pipelines_round_trip_through_save_pretrained(flow_model_dirs):
    """The folders load back with diffusers' own from_pretrained, offline, with real encoder widths and a T5
    tokenizer that keeps the vocabulary's words whole (a tokenizer built wrong would split every word in letters)."""
    for family, t5_key in (("sd3", "text_encoder_3"), ("flux", "text_encoder_2")):
        pipe = DiffusionPipeline.from_pretrained(flow_model_dirs[family])
        assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
        t5 = getattr(pipe, t5_key)
        assert t5.get_input_embeddings().embedding_dim == T5_WIDTH
        tokenizer = getattr(pipe, t5_key.replace("text_encoder", "tokenizer"))
        pieces = tokenizer.convert_ids_to_tokens(tokenizer("a photo of a cat").input_ids)
        assert pieces == ["▁a", "▁photo", "▁of", "▁a", "▁cat", "</s>"]


def test_tiny_flow_pipelines_are_deterministic_for_a_seed():
    a, b = build_random_pipeline("flux", "tiny", seed=3), build_random_pipeline("flux", "tiny", seed=3)
    assert torch.equal(a.transformer.proj_out.weight, b.transformer.proj_out.weight)

"""Memory modes and mixed precision in training: same vectors with checkpointing, model restored, bf16 autocast."""

import numpy as np
import pytest
import torch

from studio.engine.models import ModelManager
from studio.training import TrainConfig, Trainer


def _count_calls(module):
    # A pre-hook: the recomputation in the backward pass stops once it has what it needs, before forward hooks fire.
    calls = []
    return calls, module.register_forward_pre_hook(lambda *_: calls.append(1))


def _train(model, folder, out, **kw):
    events = []
    # no held-back scoring: the test counts the UNet calls of training steps
    cfg = TrainConfig("<mem>", init_text="toy", n_vectors=2, steps=3, batch_size=2, learning_rate=0.05,
                      stop_when_learned=False, **kw)
    return Trainer(model, cfg, folder, out).run(events.append), events


def test_low_vram_checkpoints_and_learns_the_same_vectors(tiny_model_dirs, pictures, tmp_path):
    """Guards against checkpointing that silently does nothing (eval mode) or changes the result."""
    model = ModelManager().load(tiny_model_dirs["sd1"])
    pipe = model.pipe
    text_model = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
    text_mlp = text_model.encoder.layers[0].mlp
    resnet = pipe.unet.up_blocks[1].resnets[0]  # after cross-attention: on the gradient's path
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}

    counted = {}
    for mode in ("fast", "low-vram"):
        (text_calls, h1), (unet_calls, h2) = _count_calls(text_mlp), _count_calls(resnet)
        concept, events = _train(model, pictures, tmp_path / mode, memory=mode)
        h1.remove(), h2.remove()
        counted[mode] = (concept, len(text_calls), len(unet_calls), events[0].message)

    fast, low = counted["fast"], counted["low-vram"]
    assert (fast[1], fast[2]) == (3, 3)  # one forward per step
    assert (low[1], low[2]) == (6, 6)  # forward + recomputation in the backward pass
    assert "gradient checkpointing (text encoder and UNet), attention slicing" in low[3]
    diff = (fast[0].vectors["text_encoder"] - low[0].vectors["text_encoder"]).abs().max().item()
    assert diff <= 1e-5
    # The shared model comes back as it was for generation.
    assert not pipe.text_encoder.training and not pipe.text_encoder.is_gradient_checkpointing
    assert not pipe.unet.is_gradient_checkpointing
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors


def test_bf16_autocast_trains_fp32_vectors_on_cpu(tiny_model_dirs, pictures, tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    seen = []
    hook = model.pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_q.register_forward_hook(
        lambda _m, _i, out: seen.append(out.dtype))
    concept, events = _train(model, pictures, tmp_path / "bf16", mixed_precision="bf16")
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # autocast really ran the UNet in bf16
    vectors = concept.vectors["text_encoder"]
    assert vectors.dtype == torch.float32 and torch.isfinite(vectors).all()
    assert all(e.loss is not None and np.isfinite(e.loss) for e in events if e.kind == "step")
    init_id = model.pipe.tokenizer("toy", add_special_tokens=False).input_ids[0]
    assert not torch.allclose(vectors[0], model.pipe.text_encoder.get_input_embeddings().weight[init_id])
    assert "precision bf16" in events[0].message


def test_auto_on_cpu_is_fast_in_fp32(tiny_model_dirs, pictures, tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    _, events = _train(model, pictures, tmp_path, memory="auto", mixed_precision="auto")
    assert "memory mode fast (savings: none); precision no" in events[0].message
    with pytest.raises(ValueError, match="memory must be"):
        TrainConfig("<x>", memory="tiny")

"""Out of memory while training ends the run as `failed`, with the memory mode to switch to, the failed step's memory
freed, the last good vectors saved (and resumable in the smaller mode), and the shared model restored.

The error is simulated (no GPU here): a forward pre-hook raises torch.OutOfMemoryError on the Nth call of a real tiny
pipeline's UNet (one call per training step) or VAE encoder (the latent cache), as CUDA's allocator does.
"""

import gc

import pytest
import torch
from diffusers import UNet2DConditionModel

from simulated_oom import OutOfMemoryOnCall
from studio.cli import main
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.registry import load_concept
from studio.engine.models import ModelManager
from studio.training import TrainConfig, TrainError, Trainer


def _config(**kw) -> TrainConfig:
    # no held-back scoring: the simulated out of memory counts the UNet calls of training steps
    return TrainConfig("<oom>", init_text="toy", steps=6, batch_size=2, learning_rate=0.05, resolution=32,
                       stop_when_learned=False, **kw)


def test_out_of_memory_in_a_step_fails_with_the_next_mode_and_keeps_the_last_good_vectors(tiny_model_dirs, pictures,
                                                                                         tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    pipe = model.pipe
    flags = {f"{m}.{n}": p.requires_grad for m in ("unet", "vae", "text_encoder")
             for n, p in getattr(pipe, m).named_parameters()}
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}

    failing, events = OutOfMemoryOnCall(n=5), []  # steps 1-4 pass; step 5 runs out of memory
    handle = pipe.unet.register_forward_pre_hook(failing)
    try:
        with pytest.raises(TrainError, match="out of memory at step 5 in 'balanced' memory mode: switch the memory "
                                             "mode to 'low-vram' and train again") as caught:
            Trainer(model, _config(memory="balanced", save_every=2), pictures, tmp_path).run(events.append)
    finally:
        handle.remove()
    assert caught.value.__cause__ is None  # one readable message, no CUDA traceback
    failed = events[-1]
    assert failed.kind == "failed" and failed.step == 4
    assert "switch the memory mode to 'low-vram'" in failed.message and "oom.safetensors" in failed.message

    # Memory: the failed step's tensors are not kept alive by the error.
    gc.collect()
    assert failing.held() is None

    # The last good vectors: the step-4 checkpoint still loads, and the failed run's file holds the same vectors.
    checkpoint = load_concept(tmp_path / "oom-step4.safetensors")
    saved = load_concept(failed.path)
    assert failed.path == tmp_path / "oom.safetensors" and saved.meta["steps"] == "4"
    assert torch.equal(saved.vectors["text_encoder"], checkpoint.vectors["text_encoder"])

    # The shared model comes back as it was: no checkpointing, same processors and requires_grad flags, eval mode.
    assert not pipe.unet.is_gradient_checkpointing and not pipe.text_encoder.is_gradient_checkpointing
    assert not pipe.text_encoder.training
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors
    assert flags == {f"{m}.{n}": p.requires_grad for m in ("unet", "vae", "text_encoder")
                     for n, p in getattr(pipe, m).named_parameters()}
    assert len(generate(model, GenerateRequest("a toy", steps=2, width=32, height=32, preview_every=0)).images) == 1

    # As the advice says: the run goes on from the saved file in the smaller mode.
    resumed = []
    smaller = _config(memory="low-vram", resume=str(failed.path))
    concept = Trainer(model, smaller, pictures, tmp_path).run(resumed.append)
    assert [e.step for e in resumed if e.kind == "step"] == [5, 6] and resumed[-1].kind == "finished"
    assert torch.isfinite(concept.vectors["text_encoder"]).all()


def test_out_of_memory_while_encoding_the_pictures_saves_nothing_and_says_so(tiny_model_dirs, pictures, tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    events = []
    handle = model.pipe.vae.encoder.register_forward_pre_hook(OutOfMemoryOnCall(n=1))
    try:
        with pytest.raises(TrainError, match="while encoding the pictures in 'low-vram' memory mode: use a smaller "
                                             "picture size or batch"):
            Trainer(model, _config(memory="low-vram"), pictures, tmp_path).run(events.append)
    finally:
        handle.remove()
    assert events[-1].kind == "failed" and events[-1].path is None
    assert not list(tmp_path.glob("*.safetensors"))
    assert model.pipe.vae.device.type == "cpu"  # where it was loaded; low-vram's move is undone


def test_studio_train_reports_the_mode_to_switch_to_in_one_line(tiny_model_dirs, pictures, tmp_path, capsys):
    """The CLI builds its own model, so the hook is global: it counts the calls of any UNet."""
    failing = OutOfMemoryOnCall(n=3)

    def on_unets(module, args):
        if isinstance(module, UNet2DConditionModel):
            failing(module, args)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(on_unets)
    try:
        code = main(["train", "--model", str(tiny_model_dirs["sd1"]), "--images", str(pictures), "--token", "<oom>",
                     "--init", "toy", "--steps", "5", "--batch", "1", "--resolution", "32", "--memory", "fast",
                     "--no-stop-when-learned",
                     "--out", str(tmp_path)])
    finally:
        handle.remove()
    printed = capsys.readouterr()
    assert code == 2
    assert "memory mode: fast" in printed.out
    assert "failed: out of memory at step 3 in 'fast' memory mode: switch the memory mode to 'balanced'" in printed.out
    assert "studio train: error: out of memory at step 3" in printed.err and "Traceback" not in printed.err
    assert load_concept(tmp_path / "oom.safetensors").meta["steps"] == "2"

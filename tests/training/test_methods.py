"""The weight-tuning methods on the demo model: what each one writes loads where its users load it, training leaves
the shared model as it was, every method resumes bit for bit, prior preservation draws its class pictures once, and
two processes (accelerate, gloo) compute what one process computes.

Runs are a few steps long with learning rates high enough that the LoRA is far from its zero start (so a picture
equality with it shows something); the methods' defaults are measured in docs/benchmarks.md, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.lora import LoraFile, loras_applied
from studio.engine.learned.word import Concept
from studio.engine.models import ModelManager
from studio.training import TrainConfig, TrainError, Trainer
from studio.training.config import lite
from studio.training.resume import load_state, save_state, state_path

REPO = Path(__file__).resolve().parents[2]
PICTURES = REPO / "assets" / "concepts" / "toy-ladybug"


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    return ModelManager().load(demo_model_dir)


def _config(method: str, **kw) -> TrainConfig:
    base = dict(init_text="toy", steps=4, batch_size=2, seed=1, method=method, unet_lr=2e-2, rank=2)
    return TrainConfig("<lb>", **{**base, **kw})


def _draw(pipe, seed: int = 3, **call) -> np.ndarray:
    return pipe(num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed), **call).images[0]


def _studio_draw(model, lora: LoraFile | None, prompt: str, words=()) -> np.ndarray:
    """The studio's picture: its prompt encoder with the words, its LoRA mechanism on the shared UNet."""
    kwargs = model.encoder.pipeline_kwargs(prompt, "", list(words))
    with model.lock, loras_applied(model, [(lora, 1.0)] if lora is not None else []):
        return _draw(model.pipe, **kwargs)


def test_a_pivotal_file_loads_in_diffusers_and_draws_there_what_the_studio_draws(demo, demo_model_dir, tmp_path):
    out = tmp_path / "ladybug.safetensors"
    learned = Trainer(demo, _config("pivotal"), PICTURES, out).run()

    assert isinstance(learned, LoraFile) and learned.kind == "word+lora"
    assert [word.token for word in learned.words] == ["<lb>"]  # the word the user trained, not diffusers' "<s0>"
    reference = StableDiffusionPipeline.from_pretrained(demo_model_dir)
    reference.load_lora_weights(str(out))
    reference.load_textual_inversion(str(tmp_path / "ladybug_emb.safetensors"), token="<lb>")
    prompt = "a photo of <lb> on a black background"
    ours = _studio_draw(demo, learned, prompt, learned.words)
    assert np.abs(ours - _draw(reference, prompt=prompt)).max() <= 1e-4
    assert np.abs(ours - _studio_draw(demo, None, prompt, learned.words)).max() > 1e-3, "the LoRA learned nothing"


def test_a_pivotal_concept_and_a_ti_word_compose_in_one_prompt(demo, tmp_path):
    pivotal = Trainer(demo, _config("pivotal"), PICTURES, tmp_path / "p.safetensors").run()
    word = Trainer(demo, _config("ti", learning_rate=0.5), PICTURES, tmp_path / "w.safetensors").run()
    word = Concept("<other>", word.vectors, word.meta)
    prompt = "<lb> beside <other>"

    def picture(concepts) -> np.ndarray:
        return np.asarray(generate(demo, GenerateRequest(prompt, concepts=concepts, seed=2, steps=4)).images[0], float)

    both = picture([pivotal, word])
    assert np.abs(both - picture([pivotal])).max() > 0  # without <other> known, the prompt says its letters
    assert np.abs(both - picture([word])).max() > 0


@pytest.mark.parametrize("method", ["pivotal", "lora"])
def test_training_leaves_the_shared_model_as_it_was(demo, tmp_path, method):
    request = GenerateRequest("a photo of a red toy", seed=4, steps=4)
    before = np.asarray(generate(demo, request).images[0])
    # by parameter object: a first LoRA wraps the UNet's linear layers in peft layers, whose names add ".base_layer"
    flags = {id(p): p.requires_grad for p in demo.pipe.unet.parameters()}
    Trainer(demo, _config(method), PICTURES, tmp_path / "x.safetensors").run()
    assert np.array_equal(np.asarray(generate(demo, request).images[0]), before)
    assert "studio-train" not in (getattr(demo.pipe.unet, "peft_config", None) or {})
    assert {id(p): p.requires_grad for p in demo.pipe.unet.parameters()} == flags


def test_the_lora_method_learns_token_and_class_and_writes_both_forms(demo, demo_model_dir, tmp_path):
    events = []
    learned = Trainer(demo, _config("lora", class_word="toy"), PICTURES, tmp_path / "d.safetensors").run(events.append)
    assert learned.kind == "lora" and not learned.words
    assert "lora (learning the weights)" in events[0].message
    reference = StableDiffusionPipeline.from_pretrained(demo_model_dir)
    reference.load_lora_weights(str(tmp_path / "d.safetensors"))
    prompt = "a photo of <lb> toy"
    assert np.abs(_studio_draw(demo, learned, prompt) - _draw(reference, prompt=prompt)).max() <= 1e-4

    kohya = Trainer(demo, _config("lora", class_word="toy", lora_format="kohya"), PICTURES,
                    tmp_path / "k.safetensors").run()
    assert kohya.source_format == "kohya"
    assert all(key.startswith("lora_unet_") for key in load_file(tmp_path / "k.safetensors"))
    assert np.abs(_studio_draw(demo, kohya, prompt) - _studio_draw(demo, learned, prompt)).max() <= 1e-5


def test_a_pivotal_word_first_schedule_keeps_the_lora_at_its_zero_start(demo, tmp_path):
    learned = Trainer(demo, _config("pivotal", word_steps=4), PICTURES, tmp_path / "w.safetensors").run()
    ups = [t for k, t in learned.state_dict.items() if "lora_B" in k]
    assert ups and all(float(t.abs().max()) == 0.0 for t in ups)  # peft starts B at zero: nothing learned yet
    later = Trainer(demo, _config("pivotal", word_steps=2), PICTURES, tmp_path / "j.safetensors").run()
    assert max(float(t.abs().max()) for k, t in later.state_dict.items() if "lora_B" in k) > 0


def test_lite_is_rank_1_on_cross_attention_keys_and_values_in_fp16(demo, tmp_path):
    cfg = lite(_config("pivotal"))
    learned = Trainer(demo, cfg, PICTURES, tmp_path / "lite.safetensors").run()
    assert learned.ranks == (1,)
    assert learned.modules["unet"] and all(m.endswith(("attn2.to_k", "attn2.to_v")) for m in learned.modules["unet"])
    assert {t.dtype for t in load_file(tmp_path / "lite.safetensors").values()} == {torch.float16}


def test_lite_on_sd15_shapes_is_under_200_kb():
    """Counted on SD 1.5's UNet built on the meta device (no memory): the lite adapter's numbers in fp16, plus one
    768-wide word."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from studio.engine.families import SD1

    config = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
              "block_out_channels": [320, 640, 1280, 1280]}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        unet.add_adapter(LoraConfig(r=1, lora_alpha=1, target_modules=SD1.lora_prompt_kv))
    numbers = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    assert numbers == 49_536  # 16 layers x (to_k + to_v) x (768 in + width out) at rank 1
    assert (numbers + 768) * 2 <= 200_000


def test_dreambooth_writes_a_model_folder_that_loads_as_a_base_model(demo, demo_model_dir, tmp_path):
    out = tmp_path / "my-toy-model"
    folder = Trainer(demo, _config("dreambooth", unet_lr=1e-3), PICTURES, out).run()
    assert folder == out and (out / "model_index.json").is_file()
    assert json.loads((out / "studio_training.json").read_text())["prompt"] == "<lb> toy"
    tuned = StableDiffusionPipeline.from_pretrained(out)
    base = StableDiffusionPipeline.from_pretrained(demo_model_dir)
    changed = [name for name, p in tuned.unet.named_parameters()
               if not torch.equal(p, dict(base.unet.named_parameters())[name])]
    assert changed, "the UNet learned nothing"
    shared = {n.replace(".base_layer", ""): p for n, p in demo.pipe.unet.named_parameters() if "lora_" not in n}
    assert all(torch.equal(shared[n], p) for n, p in base.unet.named_parameters()), "the shared UNet changed"
    loaded = ModelManager().load(out)
    assert generate(loaded, GenerateRequest("a photo of <lb> toy", seed=0, steps=2)).images
    with pytest.raises(TrainError, match="model folder"):
        Trainer(demo, _config("dreambooth"), PICTURES, tmp_path / "x.safetensors")


def _final_params(path: Path) -> dict[str, torch.Tensor]:
    return load_state(path).params


@pytest.mark.parametrize("method", ["pivotal", "lora", "dreambooth"])
def test_every_method_resumes_bit_for_bit(demo, tmp_path, method):
    """Guards against losing a method's weights, their Adam moments or the random streams on resume."""
    lr = {"dreambooth": 1e-3}.get(method, 2e-2)
    suffix = "" if method == "dreambooth" else ".safetensors"
    straight = tmp_path / f"straight{suffix}"
    Trainer(demo, _config(method, unet_lr=lr), PICTURES, straight).run()

    cancel = threading.Event()
    stop = lambda e: cancel.set() if e.kind == "step" and e.step == 2 else None  # noqa: E731
    parts = tmp_path / f"parts{suffix}"
    Trainer(demo, _config(method, unet_lr=lr, save_every=2), PICTURES, parts).run(stop, cancel)
    checkpoint = tmp_path / f"parts-step2{suffix}"
    assert state_path(checkpoint).is_file()
    events = []
    Trainer(demo, _config(method, unet_lr=lr, resume=str(checkpoint)), PICTURES, parts).run(events.append)
    assert [e.step for e in events if e.kind == "step"] == [3, 4]
    want, got = _final_params(straight), _final_params(parts)
    assert want.keys() == got.keys() and any(k.startswith("unet.") for k in want)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    # The moments matter: dropping them ends elsewhere (so the check can fail).
    state = load_state(checkpoint)
    state.adam = {}
    save_state(checkpoint, state)
    forgetful = tmp_path / f"forgetful{suffix}"
    Trainer(demo, _config(method, unet_lr=lr, resume=str(checkpoint)), PICTURES, forgetful).run()
    lost = _final_params(forgetful)
    assert max(float((want[k] - lost[k]).abs().max()) for k in want) > 1e-6


def test_resume_refuses_another_method(demo, tmp_path):
    Trainer(demo, _config("lora", save_every=2), PICTURES, tmp_path / "a.safetensors").run()
    with pytest.raises(TrainError, match="--method lora"):
        Trainer(demo, _config("pivotal", resume=str(tmp_path / "a-step2.safetensors")), PICTURES,
                tmp_path / "a.safetensors").run()


def test_prior_preservation_draws_its_class_pictures_once_and_uses_them(demo, tmp_path):
    out = tmp_path / "out"
    cfg = _config("lora", prior_preservation=True, class_images=2, class_word="toy")
    with_prior = Trainer(demo, cfg, PICTURES, out / "a.safetensors").run()
    (folder,) = (out / "class-pictures").iterdir()
    drawn = sorted(folder.glob("*.png"))
    assert [p.name for p in drawn] == ["0000.png", "0001.png"]
    stamps = [p.stat().st_mtime_ns for p in drawn]
    Trainer(demo, cfg, PICTURES, out / "b.safetensors").run()
    assert [p.stat().st_mtime_ns for p in drawn] == stamps  # reused, not drawn again
    without = Trainer(demo, _config("lora", class_word="toy"), PICTURES, out / "c.safetensors").run()
    diff = max(float((with_prior.state_dict[k] - without.state_dict[k]).abs().max()) for k in without.state_dict)
    assert diff > 1e-6, "the class pictures changed nothing"


def test_methods_refuse_what_they_cannot_do_in_one_line(demo, tmp_path):
    with pytest.raises(ValueError, match="prior preservation is for the lora and dreambooth"):
        _config("pivotal", prior_preservation=True)
    with pytest.raises(TrainError, match="8-bit Adam .* CUDA"):
        Trainer(demo, _config("lora", use_8bit_adam=True), PICTURES, tmp_path / "x.safetensors").run()
    assert "studio-train" not in (getattr(demo.pipe.unet, "peft_config", None) or {})


def _train_cli(args: list[str], processes: int, out: Path) -> str:
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "studio"]
              if processes > 1 else [sys.executable, "-m", "studio"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*launch, "train", *args, "--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_two_processes_of_batch_2_learn_what_one_process_of_batch_4_learns(demo_model_dir, tmp_path):
    """accelerate's DDP over gloo: each process takes its fixed half of every global batch, gradients are averaged;
    the LoRA must come out as one process's (fp32, max abs difference <= 1e-5; measured 5.6e-6: the two sums of a
    batch's gradients round differently, and Adam divides the few near-zero, cancelling ones by their own size)."""
    args = ["--model", str(demo_model_dir), "--images", str(PICTURES), "--token", "<lb>", "--init", "toy",
            "--method", "lora", "--steps", "4", "--batch", "4", "--seed", "1"]  # the default learning rate
    log = _train_cli(args, 2, tmp_path / "two.safetensors")
    assert "2 processes" in log
    _train_cli(args, 1, tmp_path / "one.safetensors")
    two, one = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors")
    assert two.keys() == one.keys()
    assert max(float((two[k] - one[k]).abs().max()) for k in one) <= 1e-5
    assert max(float(t.abs().max()) for k, t in load_file(tmp_path / "one.safetensors").items() if "lora_B" in k) > 1e-3

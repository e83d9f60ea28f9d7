"""Single-file (original LDM layout) checkpoints: exported, loaded offline with local configs, refused when unsafe.

Every checkpoint here is a real file written by `export_single_file` from a tiny diffusers pipeline, and loaded back
through `ModelManager` -> diffusers' `from_single_file`, with a config folder that holds no weights at all, so every
weight compared below came out of the single file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.registry import save_concept
from studio.engine.learned.word import Concept
from studio.engine.models import LoadOptions, ModelError, ModelManager
from studio.engine.single_file import (CONFIG_FILE_PATTERNS, DEFAULT_CONFIG_REPOS, export_single_file,
                                       identify_checkpoint, pipeline_to_checkpoint, read_checkpoint_shapes)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def configs_only(model_dir: Path, dest: Path) -> Path:
    """Copy what diffusers downloads from a config repo (json, txt, tokenizer files), and no weights."""
    for pattern in CONFIG_FILE_PATTERNS:
        for file in model_dir.glob(pattern):
            (dest / file.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, dest / file.relative_to(model_dir))
    assert not list(dest.rglob("*.safetensors")) and (dest / "model_index.json").is_file()
    return dest


@pytest.fixture(scope="module")
def originals(tiny_model_dirs) -> dict:
    return {family: DiffusionPipeline.from_pretrained(folder) for family, folder in tiny_model_dirs.items()}


@pytest.fixture(scope="module")
def checkpoints(originals, tiny_model_dirs, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """`{family: (checkpoint.safetensors, config folder without weights)}`."""
    root = tmp_path_factory.mktemp("single-file")
    out = {}
    for family, pipe in originals.items():
        config = configs_only(tiny_model_dirs[family], root / f"{family}-config")
        out[family] = (export_single_file(pipe, root / f"{family}.safetensors"), config)
    return out


def assert_same_weights(loaded, original) -> None:
    for name in COMPONENTS:
        if getattr(original, name, None) is None:
            continue
        want, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        different = [k for k in want if not torch.equal(want[k], got[k])]
        assert not different, f"{name}: {different[:5]}"


def picture(model) -> np.ndarray:
    req = GenerateRequest("a red cat on the beach", seed=3, steps=2, width=32, height=32)
    return np.asarray(generate(model, req).images[0])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_exported_checkpoint_loads_offline_with_identical_weights_and_pictures(family, checkpoints, originals,
                                                                               tiny_model_dirs):
    """Guards the whole single-file path: key layout both ways, family from keys, configs from a local folder."""
    path, config = checkpoints[family]
    assert identify_checkpoint(read_checkpoint_shapes(path)).family == family
    model = ModelManager(LoadOptions(device="cpu", config=str(config))).load(path)
    assert model.family == family and model.name == path.name
    assert_same_weights(model.pipe, originals[family])
    reference = ModelManager(LoadOptions(device="cpu")).load(tiny_model_dirs[family])
    assert np.array_equal(picture(model), picture(reference))


def test_exported_keys_are_the_original_layout(checkpoints):
    """Names A1111/ComfyUI look for, e.g. diffusers' own detection keys and LDM's numbering of UNet blocks."""
    sd1 = read_checkpoint_shapes(checkpoints["sd1"][0])
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in sd1
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd1 and "model.diffusion_model.out.2.weight" in sd1
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sd1
    assert len(sd1["first_stage_model.encoder.mid.attn_1.q.weight"]) == 4  # 1x1 conv, as LDM stores it
    sdxl = read_checkpoint_shapes(checkpoints["sdxl"][0])
    assert "conditioner.embedders.1.model.positional_embedding" in sdxl
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in sdxl
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl
    sd2 = read_checkpoint_shapes(checkpoints["sd2"][0])
    assert "cond_stage_model.model.token_embedding.weight" in sd2


@pytest.mark.parametrize("family, diffusers_type", [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base")])
def test_full_size_exports_have_the_layout_of_real_checkpoints(family, diffusers_type):
    """The real SD 1.5 / 2.1 / XL architectures (weights on the meta device: names and shapes only) export to files
    that diffusers' own detection calls v1 / v2 / xl_base and its converters map back onto every UNet/VAE weight."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     infer_diffusers_model_type)

    from benchmarks.architectures import build_random_pipeline

    with init_empty_weights():
        pipe = build_random_pipeline(family, "full")
    checkpoint = pipeline_to_checkpoint(pipe)
    assert infer_diffusers_model_type(checkpoint) == diffusers_type
    assert identify_checkpoint({k: tuple(v.shape) for k, v in checkpoint.items()}).family == family
    for name, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        model = getattr(pipe, name)
        converted = convert(checkpoint, dict(model.config))
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_extra_keys_of_real_checkpoints_are_ignored(checkpoints, originals, tmp_path):
    """Released checkpoints also carry position_ids, the noise schedule and EMA counters."""
    state = {k: v.contiguous() for k, v in pipeline_to_checkpoint(originals["sd1"]).items()}
    state.update({"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
                  "alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
                  "model_ema.num_updates": torch.tensor(5)})
    released = tmp_path / "released.safetensors"
    save_file(state, str(released))
    model = ModelManager(LoadOptions(device="cpu", config=str(checkpoints["sd1"][1]))).load(released)
    assert_same_weights(model.pipe, originals["sd1"])


def test_ckpt_is_read_with_weights_only_and_loads(checkpoints, originals, tmp_path):
    path, config = checkpoints["sd1"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": pipeline_to_checkpoint(originals["sd1"]), "global_step": 1000}, ckpt)
    model = ModelManager(LoadOptions(device="cpu", config=str(config))).load(ckpt)
    assert_same_weights(model.pipe, originals["sd1"])


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it calls open(sentinel, "w"), i.e. runs code of the file's choosing."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_ckpt_holding_python_objects_is_refused_without_running_them(checkpoints, originals, tmp_path):
    sentinel = tmp_path / "code-ran"
    ckpt = tmp_path / "trojan.ckpt"
    payload = {"state_dict": pipeline_to_checkpoint(originals["sd1"]), "callback": _RunsCodeWhenUnpickled(sentinel)}
    torch.save(payload, ckpt)
    options = LoadOptions(device="cpu", config=str(checkpoints["sd1"][1]))
    with pytest.raises(ModelError, match=r"objects other than tensors \(it calls io.open\).*weights_only=True"):
        ModelManager(options).load(ckpt)
    assert not sentinel.exists()
    trojan_pt = tmp_path / "trojan.pt"  # other pickle suffixes are refused the same way, not as "wrong suffix"
    shutil.copy(ckpt, trojan_pt)
    with pytest.raises(ModelError, match="Python objects other than tensors"):
        ModelManager(options).load(trojan_pt)
    assert not sentinel.exists()


def test_corrupt_files_say_they_are_unreadable(tmp_path):
    for name, data in (("short.ckpt", b"junk"), ("garbage.ckpt", b"\x80\x02" + b"\xff" * 40),
                       ("garbage.safetensors", b"\x00" * 64)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError, match=f"{name} is not a readable"):
            ModelManager(LoadOptions(device="cpu")).load(tmp_path / name)


def test_offline_without_config_says_which_config_and_how_to_pass_it(checkpoints, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as err:
        ModelManager(LoadOptions(device="cpu")).load(checkpoints["sdxl"][0])
    message = str(err.value)
    for words in ("Stable Diffusion XL checkpoint", DEFAULT_CONFIG_REPOS["sdxl"], "HF_HUB_OFFLINE",
                  "LoadOptions(config="):
        assert words in message


def test_default_config_is_read_from_the_hub_cache_offline(checkpoints, originals, monkeypatch, tmp_path):
    """A user who once loaded SD 1.5 online has its configs cached; offline they are found without `config`."""
    import huggingface_hub.constants

    repo = DEFAULT_CONFIG_REPOS["sd1"]
    cache = tmp_path / "hub"
    commit = "0" * 40
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    shutil.copytree(checkpoints["sd1"][1], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model = ModelManager(LoadOptions(device="cpu")).load(checkpoints["sd1"][0])
    assert_same_weights(model.pipe, originals["sd1"])


def test_config_of_another_family_is_refused(checkpoints):
    with pytest.raises(ModelError, match=r"config .* is a Stable Diffusion XL model but sd1.safetensors is a Stable "
                                         r"Diffusion 1.x checkpoint"):
        ModelManager(LoadOptions(device="cpu", config=str(checkpoints["sdxl"][1]))).load(checkpoints["sd1"][0])
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        ModelManager(LoadOptions(device="cpu", config=str(checkpoints["sd1"][1] / "unet"))).load(checkpoints["sd1"][0])


def test_config_of_other_layer_sizes_names_the_mismatch(checkpoints, tmp_path):
    config = Path(shutil.copytree(checkpoints["sd1"][1], tmp_path / "config"))
    encoder_config = config / "text_encoder" / "config.json"
    encoder_config.write_text(json.dumps({**json.loads(encoder_config.read_text()), "vocab_size": 1000}))
    with pytest.raises(ModelError) as err:
        ModelManager(LoadOptions(device="cpu", config=str(config))).load(checkpoints["sd1"][0])
    message = str(err.value)
    assert "token_embedding.weight expected shape torch.Size([1000, 768])" in message
    assert "same architecture" in message and "ignore_mismatched_sizes" not in message


def test_a_concept_passed_as_a_model_is_named_as_a_concept(tmp_path):
    concept = Concept("<cat-toy>", {"text_encoder": torch.randn(2, 768)})
    studio_file = save_concept(concept, tmp_path / "cat-toy.safetensors")
    with pytest.raises(ModelError, match=r"cat-toy.safetensors is a textual-inversion concept .*emb_params \[2, 768\]"):
        ModelManager(LoadOptions(device="cpu")).load(studio_file)
    a1111 = tmp_path / "bad-hands.pt"  # A1111's pickled form nests the vectors
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.randn(3, 768)},
                "name": "bad-hands", "step": 100}, a1111)
    with pytest.raises(ModelError, match=r"bad-hands.pt is a textual-inversion concept"):
        ModelManager(LoadOptions(device="cpu")).load(a1111)


@pytest.mark.parametrize("shapes, words", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "a LoRA"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "a standalone VAE"),
    ({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)},
     "one diffusers-format component"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "a UNet-only checkpoint (no VAE and no text"),
    ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}, "a ControlNet"),
    ({"transformer.blocks.0.weight": (8, 8), "head.weight": (8, 8), "other": (8,)},
     "not a Stable Diffusion checkpoint"),
])
def test_other_files_are_described_by_their_keys(shapes, words):
    info = identify_checkpoint(shapes)
    assert info.family is None and words in info.description


def test_inpainting_and_refiner_checkpoints_are_named_not_loaded(checkpoints):
    sd1 = dict(read_checkpoint_shapes(checkpoints["sd1"][0]))
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    sd1[conv_in] = (sd1[conv_in][0], 9, *sd1[conv_in][2:])
    assert "inpainting checkpoint (its UNet takes 9 input channels)" in identify_checkpoint(sd1).description
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): s
               for k, s in read_checkpoint_shapes(checkpoints["sdxl"][0]).items()
               if not k.startswith("conditioner.embedders.0.")}
    assert "SDXL refiner" in identify_checkpoint(refiner).description


def test_export_writes_safetensors_only_and_can_halve_the_file(originals, tmp_path):
    with pytest.raises(ModelError, match="writes .safetensors only"):
        export_single_file(originals["sd1"], tmp_path / "model.ckpt")
    fp32 = export_single_file(originals["sd1"], tmp_path / "fp32.safetensors")
    fp16 = export_single_file(originals["sd1"], tmp_path / "fp16.safetensors", dtype=torch.float16)
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size
    assert read_checkpoint_shapes(fp16).keys() == read_checkpoint_shapes(fp32).keys()

"""Single-file SD3 and Flux checkpoints (the original layouts of stabilityai's sd3_medium.safetensors and BFL's
flux1-dev.safetensors).

SD3 files load: the tiny SD3 is written in the original layout by `sd3_single_file.sd3_transformer_to_original` (the
inverse of diffusers' converter) with its VAE, as sd3_medium.safetensors holds them, and loaded back through
`ModelManager` -> diffusers' `StableDiffusion3Pipeline.from_single_file`, its encoders from a config folder whose
transformer and VAE weights are deleted, so those two can only come from the file. Flux files are named and refused in
one line: diffusers 0.42.1's Flux converter reads FLUX.1's 3072-wide blocks only (docs/families.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from PIL import Image
from safetensors.torch import load_file, save_file

from studio.cli import main
from studio.engine.generate import GenerateRequest, generate
from studio.engine.models import LoadOptions, ModelManager
from studio.engine.single_file import _vae_to_ldm, identify_checkpoint, read_checkpoint_shapes
from studio.errors import ModelError
from tests.engine.sd3_single_file import sd3_encoders_to_original, sd3_transformer_to_original
from tests.engine.test_single_file import configs_only


@pytest.fixture(scope="module")
def sd3_file(flow_model_dirs, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(sd3.safetensors: transformer + VAE, a config folder with the encoders' weights only, one with no weights)."""
    root = tmp_path_factory.mktemp("sd3-single-file")
    pipe = StableDiffusion3Pipeline.from_pretrained(flow_model_dirs["sd3"])
    state = {**sd3_transformer_to_original(pipe.transformer.state_dict()),
             **_vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)}
    path = root / "sd3.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    encoders_only = Path(shutil.copytree(flow_model_dirs["sd3"], root / "encoders-only"))
    for part in ("transformer", "vae"):
        for weights in (encoders_only / part).glob("*.safetensors"):
            weights.unlink()
    return path, encoders_only, configs_only(flow_model_dirs["sd3"], root / "configs-only")


def _picture(model) -> np.ndarray:
    request = GenerateRequest("a red cat on the beach", seed=3, steps=2, width=32, height=32)
    return np.asarray(generate(model, request).images[0], dtype=np.int16)


def test_an_sd3_single_file_draws_the_folders_picture(sd3_file, flow_model_dirs):
    """Guards the whole SD3 single-file path: the family from the keys, diffusers' converter on the file's transformer
    and VAE (a wrong key or an unswapped scale/shift draws another picture), the encoders from the config folder.
    The folder is loaded afresh: the session's shared SD3 model carries the LoRA tests' (inactive) adapters."""
    path, encoders_only, _ = sd3_file
    assert identify_checkpoint(read_checkpoint_shapes(path)).family == "sd3"
    model = ModelManager(LoadOptions(device="cpu", config=str(encoders_only))).load(path)
    folder = ModelManager(LoadOptions(device="cpu")).load(flow_model_dirs["sd3"])
    assert model.family == "sd3" and type(model.pipe).__name__ == "StableDiffusion3Pipeline"
    for part in ("transformer", "vae"):
        want, got = getattr(folder.pipe, part).state_dict(), getattr(model.pipe, part).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part
    assert np.abs(_picture(model) - _picture(folder)).max() <= 1


def _without_t5(folder: Path, dest: Path) -> Path:
    """`folder` as save_pretrained writes an SD3 loaded with text_encoder_3=None: no T5, null in model_index.json."""
    dest = Path(shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3")))
    index = json.loads((dest / "model_index.json").read_text())
    (dest / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None],
                                                       "tokenizer_3": [None, None]}))
    return dest


def test_an_sd3_single_file_on_a_folder_without_t5_draws_as_that_folder(sd3_file, flow_model_dirs, tmp_path):
    """A config folder saved without T5 gives a pipeline without T5 (diffusers' from_single_file asks for the null
    T5 unless it is passed as None), drawing the picture that folder draws."""
    path, encoders_only, _ = sd3_file
    model = ModelManager(LoadOptions(device="cpu", config=str(_without_t5(encoders_only, tmp_path / "a")))).load(path)
    assert model.pipe.text_encoder_3 is None and model.pipe.tokenizer_3 is None
    folder = ModelManager(LoadOptions(device="cpu")).load(_without_t5(flow_model_dirs["sd3"], tmp_path / "b"))
    assert np.abs(_picture(model) - _picture(folder)).max() <= 1


def test_an_sd3_file_with_encoders_inside_takes_only_the_missing_one_from_the_folder(flow_model_dirs, flow_models,
                                                                                     tmp_path):
    """CLIP-G and T5 converted from the file by diffusers, CLIP-L (left out of the file) from a folder that holds
    nothing else. CLIP-L stays out of the file because diffusers gives a file's CLIP-L an identity text_projection
    (SD3's is 768 x 768), which the tiny CLIP-L's 32-wide projection cannot take."""
    pipe = StableDiffusion3Pipeline.from_pretrained(flow_model_dirs["sd3"])
    path = tmp_path / "sd3-with-encoders.safetensors"
    save_file({**{k: v.contiguous() for k, v in sd3_transformer_to_original(pipe.transformer.state_dict()).items()},
               **_vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
               **sd3_encoders_to_original(pipe, ("text_encoder_2", "text_encoder_3"))}, str(path))
    clip_l_only = Path(shutil.copytree(flow_model_dirs["sd3"], tmp_path / "clip-l-only"))
    for part in ("transformer", "vae", "text_encoder_2", "text_encoder_3"):
        for weights in (clip_l_only / part).glob("*.safetensors"):
            weights.unlink()
    model = ModelManager(LoadOptions(device="cpu", config=str(clip_l_only))).load(path)
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        want, got = getattr(pipe, part).state_dict(), getattr(model.pipe, part).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part
    assert np.abs(_picture(model) - _picture(flow_models["sd3"])).max() <= 1

    # Without T5's embed_tokens (a copy of its shared embedding) diffusers leaves that weight empty: named, one line.
    tied = "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"
    save_file({k: v for k, v in load_file(path).items() if k != tied}, str(path))
    with pytest.raises(ModelError, match=r"^sd3-with-encoders.safetensors: diffusers built its text_encoder_3 "
                                         r"without 1 weights the file does not hold \(encoder.embed_tokens.weight, "
                                         r"...\); load this model from a diffusers folder instead$"):
        ModelManager(LoadOptions(device="cpu", config=str(clip_l_only))).load(path)


_BIAS = "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"
_POS = "model.diffusion_model.pos_embed"


@pytest.mark.parametrize("shapes, repo", [  # the shapes of the released files' transformers
    ({_BIAS: (9216,), _POS: (1, 36864, 1536)}, "stabilityai/stable-diffusion-3-medium-diffusers"),
    ({_BIAS: (9216,), _POS: (1, 147456, 1536)}, "stabilityai/stable-diffusion-3.5-medium"),
    ({_BIAS: (14592,), _POS: (1, 36864, 2432), "model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight":
      (9728, 2432)}, "stabilityai/stable-diffusion-3.5-large"),
    ({_BIAS: (9216,), _POS: (1, 4096, 1536)}, None),  # a size diffusers names no repo for
])
def test_an_sd3_files_default_config_is_the_repo_diffusers_picks(shapes, repo):
    """Without a config, an SD3.5 file is described by SD3.5's configs, as diffusers' fetch_diffusers_config picks
    them (by the adaLN and pos_embed sizes), not by SD3 medium's; None falls back to DEFAULT_CONFIG_REPOS["sd3"]."""
    info = identify_checkpoint(shapes)
    assert info.family == "sd3" and info.default_config == repo


def test_an_sd3_file_offline_without_config_names_the_repo_and_the_option(sd3_file, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as err:
        ModelManager(LoadOptions(device="cpu")).load(sd3_file[0])
    message = str(err.value)
    assert message.startswith("sd3.safetensors is a single-file SD3 checkpoint in the original single-file layout")
    for words in ("stabilityai/stable-diffusion-3-medium-diffusers", "HF_HUB_OFFLINE", "--model-config"):
        assert words in message
    assert "\n" not in message


def test_the_inverse_converter_round_trips_every_block_kind():
    """The tiny SD3 has one block (the last, whose context stream ends early); SD3.5's qk norms and second attention
    and the inner blocks are checked here through diffusers' own converter, weight for weight."""
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0, 1))
    state = transformer.state_dict()
    back = convert_sd3_transformer_checkpoint_to_diffusers(sd3_transformer_to_original(state))
    assert back.keys() == state.keys()
    assert [k for k in state if not torch.equal(back[k], state[k])] == []


def test_studio_generate_takes_the_config_of_an_sd3_file(sd3_file, flow_model_dirs, tmp_path):
    """`studio generate --model FILE --model-config DIR` (studio train and launch.py take the same option) draws the
    folder's picture."""
    path, encoders_only, _ = sd3_file
    common = ["generate", "--prompt", "a red cat", "--steps", "2", "--width", "32", "--height", "32", "--seed", "1"]
    config = ["--model-config", str(encoders_only)]
    assert main([*common, "--model", str(path), *config, "--out", str(tmp_path / "f.png")]) == 0
    assert main([*common, "--model", str(flow_model_dirs["sd3"]), "--out", str(tmp_path / "d.png")]) == 0
    pictures = [np.asarray(Image.open(tmp_path / name), dtype=np.int16) for name in ("f.png", "d.png")]
    assert np.abs(pictures[0] - pictures[1]).max() <= 1


def test_an_sd3_file_without_encoders_and_no_weights_to_take_them_from_says_what_to_pass(sd3_file):
    path, _, configs_only = sd3_file
    with pytest.raises(ModelError) as err:
        ModelManager(LoadOptions(device="cpu", config=str(configs_only))).load(path)
    message = str(err.value)
    assert message.startswith("sd3.safetensors is a single-file SD3 checkpoint without its CLIP-L, CLIP-G, T5 (")
    assert "holds no weights for them" in message and "LoadOptions(config=DIR)" in message and "\n" not in message


def test_a_flux_single_file_is_named_and_refused_in_one_line_with_the_reason(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(8),
               "single_blocks.0.linear1.weight": torch.zeros(8, 4), "img_in.weight": torch.zeros(4, 64)}, str(path))
    with pytest.raises(ModelError) as err:
        ModelManager().load(path)
    message = str(err.value)
    assert message.startswith("model.safetensors is a single-file Flux.1 checkpoint, which the studio does not load "
                              "(diffusers 0.42.1 converts only FLUX.1's full-width layout (inner_dim 3072)")
    assert "diffusers folder" in message and "\n" not in message

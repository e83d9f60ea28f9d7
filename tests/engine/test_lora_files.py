"""Reading LoRA files (studio.engine.learned.lora_files) and `studio concepts inspect` on them.

Every file is made in the test from real components: a peft LoRA on a tiny random SD1/SDXL pipeline, saved by
diffusers' `save_lora_weights`; the same weights under kohya's names (diffusers' `convert_state_dict_to_kohya`); an
A1111 bundle; a LoHa file. What `load_lora` returns must be what diffusers' own `load_lora_weights` accepts.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from studio.cli import main
from studio.engine.learned.lora_files import is_lora_file, load_lora
from studio.errors import LoraError, UserError

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK = 4

PIPELINES = {"sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def fresh_pipe(tiny_model_dirs, family: str):
    return PIPELINES[family].from_pretrained(tiny_model_dirs[family])


def add_random_lora(model, targets: list[str], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A peft LoRA injected into `model` with random (non-zero) A and B; returns its peft state dict
    (`….lora_A.weight`, as `get_peft_model_state_dict` gives it). Injected by peft itself rather than by
    transformers' `add_adapter`, which refuses peft < 0.22 with transformers 5 (peft 0.21.2 is installed)."""
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets), model)
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
                layers[name.replace(".default", "")] = param.detach().clone()
    return layers


def load_in_diffusers(pipe, state_dict: dict[str, torch.Tensor]) -> None:
    """`pipe.load_lora_weights` on the state dict, all of its parts (the text encoders' too: diffusers loads them
    with the installed peft 0.21.2 and transformers 5.25)."""
    pipe.load_lora_weights(state_dict)


@pytest.fixture(scope="module")
def sd1_lora(tiny_model_dirs, tmp_path_factory):
    """A diffusers-form SD1 LoRA on the UNet's and the text encoder's attention, as `save_lora_weights` writes it."""
    pipe = fresh_pipe(tiny_model_dirs, "sd1")
    unet_layers = add_random_lora(pipe.unet, UNET_ATTENTION, seed=1)
    text_layers = add_random_lora(pipe.text_encoder, TEXT_ATTENTION, seed=2)
    folder = tmp_path_factory.mktemp("sd1-lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_layers)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def sdxl_lora(tiny_model_dirs, tmp_path_factory):
    """A diffusers-form SDXL LoRA on the UNet and both text encoders."""
    pipe = fresh_pipe(tiny_model_dirs, "sdxl")
    layers = {"unet_lora_layers": add_random_lora(pipe.unet, UNET_ATTENTION, seed=3),
              "text_encoder_lora_layers": add_random_lora(pipe.text_encoder, TEXT_ATTENTION, seed=4),
              "text_encoder_2_lora_layers": add_random_lora(pipe.text_encoder_2, TEXT_ATTENTION, seed=5)}
    folder = tmp_path_factory.mktemp("sdxl-lora")
    StableDiffusionXLPipeline.save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors"


def kohya_form(diffusers_file, alpha: float = RANK) -> dict[str, torch.Tensor]:
    """The same weights under kohya's SD1 names (`lora_unet_…`, `lora_te_…`, `.lora_down/.lora_up/.alpha`)."""
    kohya = convert_state_dict_to_kohya(load_file(diffusers_file))
    renamed = {key.replace("lora_te1_", "lora_te_", 1): tensor for key, tensor in kohya.items()}
    return {key: (torch.tensor(float(alpha)) if key.endswith(".alpha") else tensor) for key, tensor in renamed.items()}


def unet_output(pipe) -> torch.Tensor:
    """One UNet forward on fixed inputs: what a LoRA on the UNet changes."""
    generator = torch.Generator().manual_seed(0)
    config = pipe.unet.config
    sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=context).sample


# ----------------------------------------------------------------------------------------------- diffusers form


def test_diffusers_sd1_lora_reads_with_rank_targets_family_and_loads_in_diffusers(sd1_lora, tiny_model_dirs):
    lora = load_lora(sd1_lora)
    assert lora.kind == "lora" and lora.source_format == "diffusers" and lora.words == []
    assert lora.rank == RANK and lora.ranks == (RANK,)
    assert set(lora.targets) == {"unet", "text_encoder"}
    assert lora.targets["unet"]["attention"] > 0 and lora.targets["unet"]["other"] == 0
    assert lora.targets["text_encoder"]["attention"] > 0
    assert lora.families == ("sd1",), "a LoRA for SD1's 768-wide cross-attention must not be offered for SDXL"
    assert lora.size_bytes == sd1_lora.stat().st_size and lora.adapter_metadata == {}

    pipe = fresh_pipe(tiny_model_dirs, "sd1")
    before = unet_output(pipe)
    load_in_diffusers(pipe, lora.state_dict)
    assert not torch.equal(unet_output(pipe), before), "the LoRA read back had no effect on the UNet"


def test_diffusers_sdxl_lora_reports_both_encoders_and_family_sdxl_and_loads_in_sdxl(sdxl_lora, tiny_model_dirs):
    lora = load_lora(sdxl_lora)
    assert set(lora.targets) == {"unet", "text_encoder", "text_encoder_2"}
    assert lora.families == ("sdxl",)
    pipe = fresh_pipe(tiny_model_dirs, "sdxl")
    load_in_diffusers(pipe, lora.state_dict)
    assert pipe.get_list_adapters().keys() >= {"unet", "text_encoder", "text_encoder_2"}


def test_text_encoder_parts_of_a_kohya_file_load_in_diffusers(sd1_lora, tiny_model_dirs, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file(kohya_form(sd1_lora), path)
    pipe = fresh_pipe(tiny_model_dirs, "sd1")
    pipe.load_lora_weights(load_lora(path).state_dict)
    assert "text_encoder" in pipe.get_list_adapters()


def test_adapter_metadata_that_diffusers_saved_is_kept(sd1_lora, tmp_path):
    """`load_lora_weights` reads lora_alpha from a file's metadata, never from a state dict: keep it for the caller."""
    unet_layers = {k.removeprefix("unet."): v for k, v in load_file(sd1_lora).items() if k.startswith("unet.")}
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=UNET_ATTENTION).to_dict()
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=unet_layers,
                                              unet_lora_adapter_metadata=config)
    lora = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.adapter_metadata["unet.lora_alpha"] == 2 * RANK and lora.adapter_metadata["unet.r"] == RANK


# --------------------------------------------------------------------------------------------------- kohya form


def test_kohya_file_is_converted_by_diffusers_and_acts_like_the_diffusers_file(sd1_lora, tiny_model_dirs, tmp_path):
    """Same weights, kohya names: the UNet must compute the same thing as with the diffusers-form file."""
    path = tmp_path / "kohya.safetensors"
    save_file(kohya_form(sd1_lora), path)
    lora = load_lora(path)
    assert lora.source_format == "kohya" and lora.families == ("sd1",) and lora.rank == RANK
    assert set(lora.targets) == {"unet", "text_encoder"}

    from_diffusers, from_kohya = fresh_pipe(tiny_model_dirs, "sd1"), fresh_pipe(tiny_model_dirs, "sd1")
    base = unet_output(from_kohya)
    load_in_diffusers(from_diffusers, load_lora(sd1_lora).state_dict)
    load_in_diffusers(from_kohya, lora.state_dict)
    assert not torch.equal(unet_output(from_kohya), base), "diffusers loaded none of the converted kohya weights"
    torch.testing.assert_close(unet_output(from_kohya), unet_output(from_diffusers), atol=1e-5, rtol=1e-5)


def test_kohya_alpha_is_folded_into_the_up_matrices(sd1_lora, tmp_path):
    """Kohya scales by alpha/rank; a state dict without alphas would lose that scale in `load_lora_weights`."""
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_file(kohya_form(sd1_lora, alpha=RANK), full)
    save_file(kohya_form(sd1_lora, alpha=RANK / 2), half)
    full_dict, half_dict = load_lora(full).state_dict, load_lora(half).state_dict
    assert full_dict.keys() == half_dict.keys() and not any(k.endswith(".alpha") for k in half_dict)
    for key in full_dict:
        expected = full_dict[key] * 0.5 if ".up." in key else full_dict[key]
        torch.testing.assert_close(half_dict[key], expected)


def text_encoder_output(pipe) -> torch.Tensor:
    """The text encoder's hidden states for fixed token ids: what a LoRA on it changes."""
    with torch.no_grad():
        return pipe.text_encoder(torch.arange(8)[None] % pipe.text_encoder.config.vocab_size)[0]


def test_diffusers_form_alphas_are_folded_as_diffusers_network_alphas(sd1_lora, tiny_model_dirs, tmp_path):
    """A diffusers-form file with an `.alpha` per pair (unet. and text_encoder.). diffusers 0.42.1's SD
    `load_lora_weights` refuses it (it reads alphas from kohya names only; its Flux loader folds them:
    tests/engine/test_flow_lora.py), and its network-alpha path scales each pair by alpha / rank: the studio's state
    dict draws what that path draws, where before the alphas were dropped (the scale-1 output)."""
    raw = load_file(sd1_lora)
    alphas = {k.replace(".lora_A.weight", ".alpha"): torch.tensor(2.0 * RANK) for k in raw if ".lora_A." in k}
    path = tmp_path / "alphas.safetensors"
    save_file({**raw, **alphas}, path)
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        fresh_pipe(tiny_model_dirs, "sd1").load_lora_weights(str(path))

    network_alphas = {key: float(alpha) for key, alpha in alphas.items()}
    reference = fresh_pipe(tiny_model_dirs, "sd1")
    reference.load_lora_into_unet(raw, network_alphas=network_alphas, unet=reference.unet)
    reference.load_lora_into_text_encoder(raw, network_alphas=network_alphas, text_encoder=reference.text_encoder)
    ours, unscaled = fresh_pipe(tiny_model_dirs, "sd1"), fresh_pipe(tiny_model_dirs, "sd1")
    load_in_diffusers(ours, load_lora(path).state_dict)
    load_in_diffusers(unscaled, load_lora(sd1_lora).state_dict)
    for output in (unet_output, text_encoder_output):
        torch.testing.assert_close(output(ours), output(reference), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(output(ours), output(unscaled), atol=1e-3), f"{output.__name__}: alphas dropped"


def test_sdxl_kohya_file_with_sgm_block_names_is_placed_and_reports_sdxl(tmp_path):
    """Kohya names SDXL's UNet blocks as sgm does (`input_blocks_4_1` = down_blocks.1.attentions.0 on SDXL base)."""
    path = tmp_path / "xl-kohya.safetensors"
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.randn(RANK, 2048), f"{name}.lora_up.weight": torch.randn(640, RANK),
               f"{name}.alpha": torch.tensor(float(RANK))}, path)
    lora = load_lora(path)
    assert lora.families == ("sdxl",) and lora.modules["unet"] == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k"]


def test_a1111_bundle_yields_weights_and_words(sd1_lora, tiny_model_dirs, tmp_path):
    vectors = torch.randn(2, 768)
    path = tmp_path / "bundle.safetensors"
    save_file({**kohya_form(sd1_lora), "bundle_emb.mychar.string_to_param.*": vectors}, path)
    lora = load_lora(path)
    assert lora.kind == "word+lora"
    assert [w.token for w in lora.words] == ["mychar"] and torch.equal(lora.words[0].vectors["text_encoder"], vectors)
    assert not any(k.startswith("bundle_emb") for k in lora.state_dict)
    load_in_diffusers(fresh_pipe(tiny_model_dirs, "sd1"), lora.state_dict)


def test_sdxl_bundle_words_have_both_encoders(sdxl_lora, tmp_path):
    path = tmp_path / "xl-bundle.safetensors"
    save_file({**load_file(sdxl_lora), "bundle_emb.xlchar.clip_l": torch.randn(1, 768),
               "bundle_emb.xlchar.clip_g": torch.randn(1, 1280)}, path)
    (word,) = load_lora(path).words
    assert word.token == "xlchar" and word.dims == {"text_encoder": 768, "text_encoder_2": 1280}


# ------------------------------------------------------------------------------------------------------ refused


def test_loha_file_is_refused_with_a_line_naming_it(tmp_path):
    path = tmp_path / "loha.safetensors"
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.hada_w1_a": torch.randn(8, 4), f"{name}.hada_w1_b": torch.randn(4, 8),
               f"{name}.hada_w2_a": torch.randn(8, 4), f"{name}.hada_w2_b": torch.randn(4, 8),
               f"{name}.alpha": torch.tensor(4.0)}, path)
    assert is_lora_file(path)
    with pytest.raises(LoraError, match=r"LoHa \(LyCORIS\).*plain LoRA") as caught:
        load_lora(path)
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)


def test_lokr_and_dora_are_refused(tmp_path):
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    for variant, tensors in (("LoKr", {f"{name}.lokr_w1": torch.randn(4, 4), f"{name}.lokr_w2": torch.randn(8, 8)}),
                             ("DoRA", {f"{name}.lora_down.weight": torch.randn(4, 32),
                                       f"{name}.lora_up.weight": torch.randn(32, 4),
                                       f"{name}.dora_scale": torch.randn(1, 32)})):
        path = tmp_path / f"{variant}.safetensors"
        save_file(tensors, path)
        with pytest.raises(LoraError, match=variant):
            load_lora(path)


def test_a_file_with_no_lora_weights_is_refused_in_one_line(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.randn(3, 3)}, path)
    assert not is_lora_file(path)
    with pytest.raises(LoraError, match="neither a LoRA nor an embedding"):
        load_lora(path)


def test_pickles_are_read_weights_only(sd1_lora, tmp_path):
    path = tmp_path / "kohya.pt"
    torch.save(kohya_form(sd1_lora), path)
    assert load_lora(path).families == ("sd1",)


# ---------------------------------------------------------------------------------------------------------- CLI


def test_cli_inspect_json_reports_kind_rank_targets_families_size(sd1_lora, capsys):
    assert main(["concepts", "inspect", str(sd1_lora), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "lora" and info["format"] == "diffusers" and info["rank"] == RANK
    assert info["families"] == ["sd1"] and info["size_bytes"] == sd1_lora.stat().st_size
    assert info["targets"]["unet"]["attention"] > 0 and info["words"] == []


def test_cli_inspect_json_names_bundled_words(sd1_lora, tmp_path, capsys):
    path = tmp_path / "bundle.safetensors"
    save_file({**kohya_form(sd1_lora), "bundle_emb.mychar.string_to_param.*": torch.randn(2, 768)}, path)
    assert main(["concepts", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "word+lora" and info["words"] == [{"token": "mychar", "vectors": 2,
                                                               "dims": {"text_encoder": 768}}]


def test_cli_inspect_json_of_an_embedding_says_kind_word(tmp_path, capsys):
    path = tmp_path / "cat.safetensors"
    save_file({"emb_params": torch.randn(1, 768)}, path)
    assert main(["concepts", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "word" and info["token"] == "cat" and info["family"] == "sd1"


def test_cli_refused_lora_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.randn(8, 4)}, path)
    assert main(["concepts", "inspect", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert "LoHa (LyCORIS)" in captured.err and "Traceback" not in captured.err


def test_cli_inspect_text_names_kind_and_targets(sd1_lora, capsys):
    assert main(["concepts", "inspect", str(sd1_lora)]) == 0
    out = capsys.readouterr().out
    assert "kind:     lora" in out and "targets:  unet:" in out and "families: sd1" in out

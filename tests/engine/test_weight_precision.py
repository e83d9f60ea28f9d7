"""How a base model's weights are held (`LoadOptions.dtype`, `.quantize`): bf16 by default for SD3/Flux on CUDA,
`--dtype` on the CLIs, and 8-bit/4-bit SD3/Flux weights through diffusers' bitsandbytes config, refused in one line
where they cannot run (no CUDA, no bitsandbytes, a family or a single file they are not offered for)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from diffusers import PipelineQuantizationConfig
from diffusers.quantizers.quantization_config import BitsAndBytesConfig as DiffusersBnb
from transformers import BitsAndBytesConfig as TransformersBnb

from studio.cli import main
from studio.engine.families import FAMILIES, family_of_index
from studio.engine.models import LoadOptions, ModelManager, check_quantize, pick_dtype, quantization_config
from studio.errors import ModelError

BNB = importlib.util.find_spec("bitsandbytes") is not None
CUDA = torch.device("cuda")  # a device name only: nothing here runs on it


def test_flow_families_default_to_bf16_on_cuda_only(flow_model_dirs, demo_model_dir):
    """diffusers loads Flux and SD3 in bf16 (their docs; Flux was trained in it): the default on a CUDA GPU with
    bf16, fp16 on one without and for the UNet families, fp32 on the CPU; --dtype always wins."""
    families = {name: family_of_index(json.loads((folder / "model_index.json").read_text()))
                for name, folder in flow_model_dirs.items()}
    assert families == {"sd3": FAMILIES["sd3"], "flux": FAMILIES["flux"]}
    assert family_of_index(json.loads((demo_model_dir / "model_index.json").read_text())) is None
    flux = families["flux"]
    assert pick_dtype(None, CUDA, flux, bf16_supported=True) is torch.bfloat16
    assert pick_dtype(None, CUDA, flux, bf16_supported=False) is torch.float16  # a T4 / V100
    assert pick_dtype(None, CUDA, None, bf16_supported=True) is torch.float16  # SD 1.x/2.x/SDXL
    assert pick_dtype(None, torch.device("cpu"), flux) is torch.float32
    assert pick_dtype("fp16", CUDA, flux, bf16_supported=True) is torch.float16


def test_dtype_flag_loads_the_flux_folder_in_bf16(flow_model_dirs, tmp_path):
    """`studio generate --dtype bf16` holds every weight in bf16 and still draws (on the CPU here)."""
    model = ModelManager().load(flow_model_dirs["flux"], LoadOptions(dtype="bf16"))
    assert model.dtype is torch.bfloat16 and model.quantize == "none"
    assert {p.dtype for p in model.pipe.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.pipe.text_encoder_2.parameters()} == {torch.bfloat16}
    out = tmp_path / "bf16.png"
    assert main(["generate", "--model", str(flow_model_dirs["flux"]), "--prompt", "a cat", "--steps", "1",
                 "--width", "64", "--height", "64", "--seed", "1", "--dtype", "bf16", "--out", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantization_config_is_diffusers_bitsandbytes_on_transformer_and_t5(bits):
    """The config diffusers' from_pretrained takes (a PipelineQuantizationConfig; it validates its backend and
    arguments against both diffusers' and transformers' BitsAndBytesConfig as it is made): the transformer
    (a diffusers model) and T5 (a transformers model) in `bits`, the CLIP encoders and the VAE as they are."""
    for family, t5 in (("flux", "text_encoder_2"), ("sd3", "text_encoder_3")):  # t5_keys(family)
        config = quantization_config(bits, FAMILIES[family], torch.bfloat16)
        assert isinstance(config, PipelineQuantizationConfig)
        assert config.quant_backend == f"bitsandbytes_{bits}" and config.components_to_quantize == ["transformer", t5]
        resolved = [config._resolve_quant_config(is_diffusers=False, module_name=t5)]
        assert isinstance(resolved[0], TransformersBnb)
        if bits == "8bit" or BNB:  # diffusers' 4-bit BitsAndBytesConfig reads bitsandbytes' version as it is made
            resolved.append(config._resolve_quant_config(is_diffusers=True, module_name="transformer"))
            assert isinstance(resolved[-1], DiffusersBnb)
        for quantized in resolved:
            assert (quantized.load_in_8bit, quantized.load_in_4bit) == (bits == "8bit", bits == "4bit")
            if bits == "4bit":
                assert quantized.bnb_4bit_quant_type == "nf4"
                assert quantized.bnb_4bit_compute_dtype is torch.bfloat16
        for kept in ("text_encoder", "vae", *(["text_encoder_2"] if family == "sd3" else [])):  # never built
            assert config._resolve_quant_config(is_diffusers=kept == "vae", module_name=kept) is None
    assert quantization_config("none", FAMILIES["flux"], torch.bfloat16) is None


def test_quantize_is_refused_in_one_line_where_it_cannot_run(flow_model_dirs, tmp_path, capsys):
    """Not CUDA, bitsandbytes missing, a UNet family, an unknown value: one line saying what to do, before the
    weights are read."""
    with pytest.raises(ModelError, match=r"needs a CUDA GPU .* loads on cpu"):
        ModelManager().load(flow_model_dirs["flux"], LoadOptions(device="cpu", quantize="4bit"))
    if not BNB:
        with pytest.raises(ModelError, match=r"needs bitsandbytes: pip install"):
            check_quantize("8bit", CUDA)
    else:
        check_quantize("8bit", CUDA)
    with pytest.raises(ModelError, match="offered for SD3 and Flux"):
        quantization_config("8bit", None, torch.float16)
    with pytest.raises(ModelError, match="must be one of none, 8bit, 4bit"):
        check_quantize("2bit", CUDA)
    assert main(["generate", "--model", str(flow_model_dirs["sd3"]), "--prompt", "a cat", "--quantize", "8bit",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--quantize 8bit needs a CUDA GPU" in err and len(err.splitlines()) == 1

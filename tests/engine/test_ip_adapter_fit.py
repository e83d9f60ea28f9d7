"""Whether an IP-Adapter fits a model, asked before any work (studio/engine/learned/ip_adapter_fit.py).

What these guard: `studio encode` and `studio train --init-from-encoder` refuse an adapter made for another family, a
transformer model (SD3, Flux) and an image encoder the adapter cannot read in one line (exit 2) from the model's files
alone, before the model loads (the model folders here hold only their JSON files, so a load would fail otherwise);
a loaded model refuses it before the pictures are encoded; and the layer check is diffusers' (its numbering in
`attn_processors` order: at SD 1.5's shapes, numbering in forward order is refused as diffusers' converter refuses it).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPVisionConfig

from benchmarks.architectures import _unet
from studio.cli import main
from studio.engine.learned.image_encoding import encode_pictures
from studio.engine.learned.ip_adapter_fit import check_adapter_fit
from studio.engine.learned.word import ConceptMismatchError
from studio.engine.models import ModelManager
from tests.engine.test_image_prompt import VISION, _adapter_file, _pictures


@pytest.fixture(scope="module")
def files(tiny_model_dirs, tmp_path_factory):
    """An SDXL adapter, SD1 and SD3 model folders of JSON files only, pictures, a mismatched image encoder."""
    root = tmp_path_factory.mktemp("fit")
    xl_unet = UNet2DConditionModel.from_pretrained(tiny_model_dirs["sdxl"] / "unet")
    adapter = _adapter_file(root / "xl-adapter", xl_unet, plus=False, seed=1)
    sd1 = root / "sd1-json"
    (sd1 / "unet").mkdir(parents=True)
    shutil.copy(tiny_model_dirs["sd1"] / "model_index.json", sd1)
    shutil.copy(tiny_model_dirs["sd1"] / "unet" / "config.json", sd1 / "unet")
    sd3 = root / "sd3-json"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                      "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    (root / "pics").mkdir()
    for i, picture in enumerate(_pictures(20, 2)):
        picture.save(root / "pics" / f"{i}.png")
    other = root / "other-encoder"
    other.mkdir()
    CLIPVisionConfig(**{**VISION, "projection_dim": 24}).save_pretrained(other)
    return {"adapter": adapter, "sd1": sd1, "sd3": sd3, "pics": root / "pics", "other_encoder": other}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def _encode(files, tmp_path, model, *extra) -> int:
    return main(["encode", "--model", str(model), "--images", str(files["pics"]), "--token", "<toy>",
                 "--adapter", str(files["adapter"]), "--out", str(tmp_path / "toy.safetensors"), *extra])


def test_encode_refuses_another_familys_adapter_before_the_model_loads(files, tmp_path, capsys):
    assert _encode(files, tmp_path, files["sd1"]) == 2
    err = _one_line_error(capsys)
    assert "is an IP-Adapter for SDXL (2048-wide cross-attention), but the model sd1-json is SD 1.x (768)" in err
    assert "use the IP-Adapter made for it" in err and not (tmp_path / "toy.safetensors").exists()


def test_encode_refuses_a_transformer_model_before_it_loads(files, tmp_path, capsys):
    assert _encode(files, tmp_path, files["sd3"]) == 2
    assert "image concepts run on UNet models" in _one_line_error(capsys)


def test_encode_refuses_an_image_encoder_the_adapter_cannot_read(files, tiny_model_dirs, tmp_path, capsys):
    xl = tmp_path / "xl-json"
    (xl / "unet").mkdir(parents=True)
    shutil.copy(tiny_model_dirs["sdxl"] / "unet" / "config.json", xl / "unet")
    assert _encode(files, tmp_path, xl, "--image-encoder", str(files["other_encoder"])) == 2
    assert "reads 16-wide image features (projection_dim), but its image encoder gives 24" in _one_line_error(capsys)


def test_an_unreadable_image_encoder_config_is_one_line(files, tiny_model_dirs, tmp_path, capsys):
    broken = tmp_path / "broken-encoder"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert _encode(files, tmp_path, tiny_model_dirs["sdxl"], "--image-encoder", str(broken)) == 2
    assert "config.json is unreadable (JSONDecodeError)" in _one_line_error(capsys)


def test_quick_tuning_refuses_another_familys_adapter_before_the_model_loads(files, tmp_path, capsys):
    assert main(["train", "--model", str(files["sd1"]), "--images", str(files["pics"]), "--token", "<toy>",
                 "--init", "toy", "--init-from-encoder", str(files["adapter"]), "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert err.endswith("use the IP-Adapter made for it (and its image encoder)") and "--init-from-encoder" in err


def test_a_loaded_model_refuses_it_before_the_pictures_are_encoded(files, tiny_model_dirs):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    with pytest.raises(ConceptMismatchError, match=r"ip-adapter\.safetensors is an IP-Adapter for SDXL"):
        encode_pictures(model, _pictures(21), "<toy>", str(files["adapter"]))
    assert not model.image_adapters.vision  # the vision model was not even loaded


def _shapes(unet, order: list[str]) -> dict:
    """A plain adapter's tensor shapes for `unet`, its cross-attention layers numbered 1, 3, ... in `order`."""
    cross = unet.config.cross_attention_dim
    shapes = {"image_proj.proj.weight": (4 * cross, 1024)}
    for n, name in enumerate(order):
        for part in ("to_k_ip", "to_v_ip"):
            shapes[f"ip_adapter.{2 * n + 1}.{part}.weight"] = (unet.get_submodule(name).to_k.out_features, cross)
    return shapes


def _state(shapes: dict) -> dict:
    """An adapter state dict (`read_adapter`'s form) of uninitialised tensors of `shapes`."""
    return {part: {name.split(".", 1)[1]: torch.empty(shape) for name, shape in shapes.items()
                   if name.startswith(part + ".")} for part in ("image_proj", "ip_adapter")}


def test_the_layer_check_is_diffusers_numbering_at_sd15_shapes():
    with torch.device("meta"):
        unet = _unet("sd1", "full", 768)
    diffusers_order = [k.removesuffix(".processor") for k in unet.attn_processors if k.endswith("attn2.processor")]
    forward_order = ([n for n in diffusers_order if not n.startswith(("up_", "mid_"))]
                     + [n for n in diffusers_order if n.startswith("mid_")]
                     + [n for n in diffusers_order if n.startswith("up_")])
    check_adapter_fit(_shapes(unet, diffusers_order), dict(unet.config), "a.safetensors")
    unet._convert_ip_adapter_attn_to_diffusers([_state(_shapes(unet, diffusers_order))], low_cpu_mem_usage=False)
    with pytest.raises(ConceptMismatchError, match=r"a\.safetensors's layer 19 is 1280 wide, but this model's "
                                                   r"up_blocks\.2\.attentions\.0\.transformer_blocks\.0\.attn2 is 640"):
        check_adapter_fit(_shapes(unet, forward_order), dict(unet.config), "a.safetensors")
    with pytest.raises(RuntimeError, match="size mismatch"):  # diffusers' converter refuses it too, in its way
        unet._convert_ip_adapter_attn_to_diffusers([_state(_shapes(unet, forward_order))], low_cpu_mem_usage=False)
    with pytest.raises(ConceptMismatchError, match="has 15 cross-attention layers, this model's UNet 16"):
        check_adapter_fit(_shapes(unet, diffusers_order[:-1]), dict(unet.config), "a.safetensors")

"""Writing LoRA files (studio.engine.learned.lora_export) and `studio concepts export`.

The LoRAs are made in the test as in test_lora_files.py (peft on a tiny random SD1/SDXL pipeline, saved by diffusers'
`save_lora_weights`; kohya names by diffusers' `convert_state_dict_to_kohya`). What these tests guard: a file written
in either form computes what its source computes (the UNet and text-encoder outputs as the studio applies it, and
as diffusers' own `load_lora_weights(file)` applies it), a scale kept in diffusers' adapter metadata or in kohya's
alphas is not lost on the way, bundled words survive both forms, and no export overwrites a file or leaves its folder
unasked.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from test_lora_files import (PIPELINES, RANK, TEXT_ATTENTION, UNET_ATTENTION,
                             add_random_lora, fresh_pipe, kohya_form)

from studio.cli import main
from studio.engine.learned.lora import loras_applied
from studio.engine.learned.lora_export import export_lora
from studio.engine.learned.lora_files import load_lora
from studio.engine.models import ModelManager
from studio.engine.names import WordError
from studio.errors import LoraError

# The UNet LoRAs are saved with lora_alpha = 2 * rank in their adapter metadata: a file that dropped the metadata (or
# a kohya file that dropped its scale) would compute half the change and fail the comparisons below.
UNET_ALPHA = 2 * RANK


def _save(pipeline_class, folder, **layers):
    pipeline_class.save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(tiny_model_dirs, tmp_path_factory):
    """Per family: "unet" a UNet-only LoRA with lora_alpha = 2 * rank in its metadata; "full" the same UNet weights
    without metadata plus LoRAs on every text encoder."""
    made = {}
    for family, seed in (("sd1", 1), ("sdxl", 3)):
        pipe, cls = fresh_pipe(tiny_model_dirs, family), PIPELINES[family]
        unet = add_random_lora(pipe.unet, UNET_ATTENTION, seed=seed)
        config = LoraConfig(r=RANK, lora_alpha=UNET_ALPHA, target_modules=UNET_ATTENTION).to_dict()
        names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
        encoders = {f"{name}_lora_layers": add_random_lora(getattr(pipe, name), TEXT_ATTENTION, seed=seed + k)
                    for k, name in enumerate(names, start=1)}
        root = tmp_path_factory.mktemp(f"{family}-export")
        made[family] = {
            "unet": _save(cls, root / "unet", unet_lora_layers=unet, unet_lora_adapter_metadata=config),
            "full": _save(cls, root / "full", unet_lora_layers=unet, **encoders),
        }
    return made


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    """The studio's loaded models, one per family; LoRAs are applied to them per call as `generate` applies them."""
    manager = ModelManager()
    return {family: manager.load(tiny_model_dirs[family]) for family in ("sd1", "sdxl")}


def unet_output(pipe) -> torch.Tensor:
    """One UNet forward on fixed inputs; SDXL's UNet also takes the pooled text embedding and the six size/crop ids,
    whose widths its config gives (`projection_class_embeddings_input_dim` = pooled + 6 * `addition_time_embed_dim`)."""
    generator = torch.Generator().manual_seed(0)
    config = pipe.unet.config
    sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                      "time_ids": torch.randn(1, 6, generator=generator)}
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=context, **extra).sample


def studio_output(model, lora) -> torch.Tensor:
    """The UNet output with `lora` applied by the studio (`loras_applied`, weight 1)."""
    with model.lock, loras_applied(model, [(lora, 1.0)]):
        return unet_output(model.pipe)


def diffusers_output(tiny_model_dirs, family: str, path) -> torch.Tensor:
    """The UNet output after diffusers' own `load_lora_weights(file)` on a fresh pipeline."""
    pipe = fresh_pipe(tiny_model_dirs, family)
    before = unet_output(pipe)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    after = unet_output(pipe)
    assert not torch.equal(after, before), f"diffusers loaded {path.name} but the UNet computes what it did"
    return after


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_to_kohya_keeps_the_unet_output_and_loads_in_diffusers(family, loras, models, tiny_model_dirs,
                                                                        tmp_path):
    """The metadata's lora_alpha (scale 2) must reach kohya's form, which has no metadata: folded into lora_up."""
    source = load_lora(loras[family]["unet"])
    assert source.adapter_metadata["unet.lora_alpha"] == UNET_ALPHA
    written = export_lora(source, tmp_path, "as-kohya", "kohya")
    assert written.path == (tmp_path / "as-kohya.safetensors").resolve() and written.words_path is None
    keys = load_file(written.path)
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                        for k in keys)

    exported = load_lora(written.path)
    assert exported.source_format == "kohya" and exported.families == source.families
    expected = studio_output(models[family], source)
    assert_same(studio_output(models[family], exported), expected)
    assert_same(diffusers_output(tiny_model_dirs, family, written.path), expected)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_to_diffusers_keeps_the_unet_output_and_loads_in_diffusers(family, loras, models, tiny_model_dirs,
                                                                        tmp_path):
    """A kohya alpha of rank / 2 (scale 0.5) must survive into diffusers' form."""
    kohya = tmp_path / "kohya.safetensors"
    save_file({k: v for k, v in kohya_form(loras[family]["unet"], alpha=RANK / 2).items()
               if k.startswith("lora_unet_")}, kohya)
    source = load_lora(kohya)
    written = export_lora(source, tmp_path / "out", "as-diffusers.safetensors", "diffusers")
    keys = load_file(written.path)
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)

    exported = load_lora(written.path)
    assert exported.source_format == "diffusers"
    expected = studio_output(models[family], source)
    assert not torch.equal(expected, studio_output(models[family], load_lora(loras[family]["unet"]))), \
        "alpha = rank / 2 should change the LoRA's effect, or this test checks nothing about the scale"
    assert_same(studio_output(models[family], exported), expected)
    assert_same(diffusers_output(tiny_model_dirs, family, written.path), expected)


def test_diffusers_export_keeps_the_adapter_metadata(loras, tmp_path):
    source = load_lora(loras["sd1"]["unet"])
    exported = load_lora(export_lora(source, tmp_path, "again", "diffusers").path)
    assert exported.adapter_metadata == source.adapter_metadata
    assert load_file(exported.path).keys() == load_file(source.path).keys()


@pytest.mark.parametrize("family, encoders", [("sd1", {"lora_te_"}), ("sdxl", {"lora_te1_", "lora_te2_"})])
def test_text_encoder_parts_take_kohya_names_and_come_back_unchanged(family, encoders, loras, tmp_path):
    """SD 1.x: `lora_te_` (A1111's name; diffusers' converter says `lora_te1_`); SDXL: `lora_te1_` and `lora_te2_`;
    every layer named from `text_model` as A1111 and ComfyUI look it up, though transformers 5's CLIPTextModel is
    flat. diffusers -> kohya -> diffusers gives the original tensors (no metadata: scale 1 both ways)."""
    original = {key.replace(".text_model.", "."): t for key, t in load_file(loras[family]["full"]).items()}
    kohya = export_lora(load_lora(loras[family]["full"]), tmp_path, "k", "kohya").path
    encoder_keys = [key for key in load_file(kohya) if key.startswith("lora_te")]
    assert encoder_keys and all("_text_model_encoder_layers_" in key for key in encoder_keys), encoder_keys[:2]
    assert {key.split("text_model")[0] for key in encoder_keys} == encoders
    back = load_file(export_lora(load_lora(kohya), tmp_path, "d", "diffusers").path)
    back = {key.replace(".text_model.", "."): t for key, t in back.items()}
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        torch.testing.assert_close(back[key], tensor, atol=1e-6, rtol=1e-6)


def text_encoder_outputs(pipe) -> list[torch.Tensor]:
    """Each text encoder's last hidden state for one fixed row of token ids."""
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        return [getattr(pipe, name)(ids).last_hidden_state for name in ("text_encoder", "text_encoder_2")
                if getattr(pipe, name, None) is not None]


@pytest.mark.parametrize("form", ["diffusers", "kohya"])
def test_files_with_text_encoder_parts_load_in_diffusers_and_give_its_encoder_outputs(form, loras, models,
                                                                                      tiny_model_dirs, tmp_path):
    """Guards the text-encoder half of an export: both forms load in diffusers with every part, and the studio's
    text encoders with the exported file compute what diffusers' do with the source file."""
    written = export_lora(load_lora(loras["sdxl"]["full"]), tmp_path, "full", form).path
    pipe = fresh_pipe(tiny_model_dirs, "sdxl")
    pipe.load_lora_weights(str(written.parent), weight_name=written.name)
    assert pipe.get_list_adapters().keys() >= {"unet", "text_encoder", "text_encoder_2"}

    reference = fresh_pipe(tiny_model_dirs, "sdxl")
    before = text_encoder_outputs(reference)
    reference.load_lora_weights(str(loras["sdxl"]["full"]))
    expected = text_encoder_outputs(reference)
    model = models["sdxl"]
    with model.lock, loras_applied(model, [(load_lora(written), 1.0)]):
        ours = text_encoder_outputs(model.pipe)
    for k, (got, want, plain) in enumerate(zip(ours, expected, before)):
        assert not torch.equal(want, plain), f"text encoder {k + 1}: the LoRA changed nothing, the test shows nothing"
        assert_same(got, want)
    if form == "kohya":  # kohya writes each alpha as a float; A1111 and ComfyUI read it as one
        alphas = [t for key, t in load_file(written).items() if key.endswith(".alpha")]
        assert alphas and all(t.is_floating_point() and t.dim() == 0 for t in alphas)


# ------------------------------------------------------------------------------------------------------- words


def test_a1111_bundle_words_survive_kohya_and_become_a_pivotal_pair_in_diffusers(loras, tmp_path):
    vectors = torch.randn(2, 768)
    bundle = tmp_path / "bundle.safetensors"
    save_file({**kohya_form(loras["sd1"]["full"]), "bundle_emb.mychar.string_to_param.*": vectors}, bundle)
    source = load_lora(bundle)

    kohya = load_lora(export_lora(source, tmp_path / "k", "bundle", "kohya").path)
    assert [w.token for w in kohya.words] == ["mychar"] and torch.equal(kohya.words[0].vectors["text_encoder"], vectors)

    written = export_lora(source, tmp_path / "d", "bundle", "diffusers")
    assert written.words_path == written.path.with_name("bundle_emb.safetensors")
    assert load_file(written.words_path).keys() == {"clip_l"}
    # diffusers' pivotal pair: one word; diffusers prompts it "<s0><s1>", the studio reads back the word it wrote
    (word,) = load_lora(written.path).words
    assert word.token == "mychar" and torch.equal(word.vectors["text_encoder"], vectors)
    save_file(load_file(written.words_path), written.words_path)  # the same tensors without the studio's metadata
    assert [w.token for w in load_lora(written.path).words] == ["<s0><s1>"]


def test_sdxl_pivotal_pair_survives_both_forms(loras, tmp_path):
    clip_l, clip_g = torch.randn(1, 768), torch.randn(1, 1280)
    pair = tmp_path / "pivotal.safetensors"
    pair.write_bytes(loras["sdxl"]["unet"].read_bytes())
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "pivotal_emb.safetensors")
    source = load_lora(pair)
    assert [w.token for w in source.words] == ["<s0>"]

    kohya = export_lora(source, tmp_path / "k", "pivotal", "kohya").path
    assert {"bundle_emb.<s0>.clip_l", "bundle_emb.<s0>.clip_g"} <= load_file(kohya).keys()
    diffusers = export_lora(source, tmp_path / "d", "pivotal", "diffusers").path
    for path in (kohya, diffusers):
        (word,) = load_lora(path).words
        assert word.token == "<s0>", path.name
        assert torch.equal(word.vectors["text_encoder"], clip_l) and torch.equal(word.vectors["text_encoder_2"], clip_g)


def test_several_words_are_refused_in_diffusers_form_with_what_to_do(loras, tmp_path):
    bundle = tmp_path / "two.safetensors"
    save_file({**kohya_form(loras["sd1"]["full"]), "bundle_emb.a.string_to_param.*": torch.randn(1, 768),
               "bundle_emb.b.string_to_param.*": torch.randn(1, 768)}, bundle)
    with pytest.raises(LoraError, match="pivotal form holds one.*--format kohya"):
        export_lora(load_lora(bundle), tmp_path / "out", "two", "diffusers")
    assert not (tmp_path / "out").exists(), "nothing may be written when the export is refused"


# ------------------------------------------------------------------------------------------------------ refusals


def test_an_existing_file_is_kept_unless_overwrite_is_asked(loras, tmp_path):
    source = load_lora(loras["sd1"]["unet"])
    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(LoraError, match="already exists.*overwrite"):
        export_lora(source, tmp_path, "mine", "kohya")
    assert target.read_bytes() == b"keep me"
    export_lora(source, tmp_path, "mine", "kohya", overwrite=True)
    assert load_lora(target).source_format == "kohya"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.safetensors"], "a temp file was left behind"


def test_an_existing_words_file_is_kept_too(loras, tmp_path):
    pair = tmp_path / "src" / "p.safetensors"
    pair.parent.mkdir()
    pair.write_bytes(loras["sd1"]["unet"].read_bytes())
    save_file({"clip_l": torch.randn(1, 768)}, pair.with_name("p_emb.safetensors"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "p_emb.safetensors").write_bytes(b"keep me")
    with pytest.raises(LoraError, match="p_emb.safetensors already exists"):
        export_lora(load_lora(pair), tmp_path / "out", "p", "diffusers")
    assert not (tmp_path / "out" / "p.safetensors").exists()


def test_a_stale_words_file_that_would_become_the_exports_words_is_refused(loras, tmp_path):
    save_file({"clip_l": torch.randn(1, 768)}, tmp_path / "plain_emb.safetensors")
    with pytest.raises(LoraError, match="would be read as its words"):
        export_lora(load_lora(loras["sd1"]["unet"]), tmp_path, "plain", "diffusers")


def test_a_name_that_leaves_the_folder_is_refused(loras, tmp_path):
    with pytest.raises(WordError, match="outside"):
        export_lora(load_lora(loras["sd1"]["unet"]), tmp_path / "out", "../escaped", "kohya")
    assert not (tmp_path / "escaped.safetensors").exists()


def test_unknown_format_and_wrong_suffix_are_refused(loras, tmp_path):
    source = load_lora(loras["sd1"]["unet"])
    with pytest.raises(LoraError, match="choose one of diffusers, kohya"):
        export_lora(source, tmp_path, "x", "lycoris")
    with pytest.raises(LoraError, match=r"name it x\.safetensors"):
        export_lora(source, tmp_path, "x.pt", "kohya")
    assert export_lora(source, tmp_path, "style-v1.5", "kohya").path.name == "style-v1.5.safetensors"


# ---------------------------------------------------------------------------------------------------------- CLI


def test_cli_export_writes_the_file(loras, tmp_path, capsys):
    out = tmp_path / "cli" / "style.safetensors"
    assert main(["concepts", "export", str(loras["sd1"]["unet"]), "--format", "kohya", "--out", str(out)]) == 0
    assert load_lora(out).source_format == "kohya" and str(out.resolve()) in capsys.readouterr().out


def test_cli_export_of_a_bad_input_exits_2_in_one_line(loras, tmp_path, capsys):
    not_lora = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.randn(3, 3)}, not_lora)
    assert main(["concepts", "export", str(not_lora), "--format", "kohya", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a LoRA file" in err and "concepts convert" in err and err.count("\n") == 1 and "Traceback" not in err

    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"keep me")
    args = ["concepts", "export", str(loras["sd1"]["unet"]), "--format", "diffusers", "--out", str(existing)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0 and load_lora(existing).source_format == "diffusers"

"""Concept files: every form reads and writes bit for bit, diffusers loads what we write, bad files are refused."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from studio.engine.families import ENCODER_KEYS
from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word import Concept, ConceptError, ConceptMismatchError, check_fits
from studio.engine.learned.word_files import FORMATS

SD1 = {"text_encoder": 768}
SD2 = {"text_encoder": 1024}
SDXL = {"text_encoder": 768, "text_encoder_2": 1280}
FAMILY_DIMS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}

# /work/shared/compat/README.md: file -> (vectors, dims by encoder, token when read with the file-name rule)
COMPAT_EXPECTED = {
    "fastai_learned_embeds.bin": (1, SD1),
    "rummd_learned_embeds.bin": (1, SD1),
    "soejrd_learned_embeds.bin": (1, SD1),
    "SingleInsert_learned_embeds.bin": (1, SD1),
    "ttekcor_learned_embeds.safetensors": (1, SD1),
    "bad-hands-5.pt": (2, SD1),
    "badhandv4.pt": (6, SD1),
    "negative_hand-neg.pt": (8, SD1),
    "SD1.5-HairDetail.pt": (3, SD1),
    "cartoonish_doll.pt": (8, SD2),
    "dgtlv2.pt": (12, SD2),
    "EasyNegative.pt": (8, SD1),
    "EasyNegativeV2.safetensors": (16, SD1),
    "invokeai_test_embedding.safetensors": (5, SD1),
    "SDXL-Detail.safetensors": (2, SDXL),
    "SDXL-HairDetail.safetensors": (8, SDXL),
}


def random_concept(family: str, token: str = "<thing>", n: int = 3, seed: int = 0) -> Concept:
    generator = torch.Generator().manual_seed(seed)
    vectors = {key: torch.randn(n, dim, generator=generator) for key, dim in FAMILY_DIMS[family].items()}
    return Concept(token, vectors, {"base_model": "tiny-" + family, "init_text": "toy", "steps": "42"})


def assert_same_vectors(a: Concept, b: Concept) -> None:
    assert a.dims == b.dims
    for key in a.vectors:
        assert a.vectors[key].dtype == b.vectors[key].dtype
        assert torch.equal(a.vectors[key], b.vectors[key]), f"{key} vectors changed"


# ------------------------------------------------------------------------------------------------ compat corpus


@pytest.mark.parametrize("name", sorted(COMPAT_EXPECTED))
def test_every_shared_real_world_file_reads_with_expected_sizes(compat_dir, name):
    """Guards against 'embedding skipped': each file people actually share reads with the README's vectors x dims."""
    n, dims = COMPAT_EXPECTED[name]
    concept = load_concept(compat_dir / name)
    assert concept.n_vectors == n
    assert concept.dims == dims
    assert concept.token == Path(name).stem  # A1111 rule: the file name is the trigger word
    assert all(torch.isfinite(t).all() for t in concept.vectors.values())


def test_compat_stored_names_and_a1111_metadata_are_kept(compat_dir):
    """The stored name (often different from the file name) and A1111's step/checkpoint survive in meta."""
    hands = load_concept(compat_dir / "badhandv4.pt")
    assert hands.token == "badhandv4" and hands.meta["stored_name"] == "badhandv3"
    assert hands.meta["steps"] == "15001" and hands.meta["source_format"] == "a1111"
    doll = load_concept(compat_dir / "cartoonish_doll.pt")
    assert doll.meta["base_model"] == "v2-1_768-ema-pruned" and doll.family == "sd2"
    birb = load_concept(compat_dir / "fastai_learned_embeds.bin")
    assert birb.meta["stored_name"] == "<birb-style>" and birb.meta["source_format"] == "diffusers"
    assert load_concept(compat_dir / "EasyNegative.pt").meta["source_format"] == "kohya"
    assert load_concept(compat_dir / "fastai_learned_embeds.bin", token="<birb>").token == "<birb>"


def test_compat_files_convert_to_every_form_bit_for_bit(compat_dir, tmp_path):
    for name in ("badhandv4.pt", "cartoonish_doll.pt", "SDXL-HairDetail.safetensors", "fastai_learned_embeds.bin"):
        original = load_concept(compat_dir / name)
        for fmt in FORMATS:
            written = save_concept(original, tmp_path / fmt / original.token, format=fmt)
            assert_same_vectors(original, load_concept(written))


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_written_form_reads_back_bit_for_bit(tmp_path, family, fmt):
    concept = random_concept(family)
    written = save_concept(concept, tmp_path / "<thing>", format=fmt)
    back = load_concept(written)
    assert back.token == "<thing>"
    # A1111 and kohya share one SDXL layout (clip_l + clip_g), read back as "sdxl".
    expected = "sdxl" if family == "sdxl" and fmt in ("a1111", "kohya") else fmt
    assert back.meta["source_format"] == expected
    assert_same_vectors(concept, back)


def test_half_precision_vectors_keep_their_dtype_bitwise(tmp_path):
    concept = Concept("<half>", {"text_encoder": torch.randn(2, 768).half()})
    for fmt in FORMATS:
        assert_same_vectors(concept, load_concept(save_concept(concept, tmp_path / fmt / "<half>", format=fmt)))


def test_studio_canonical_layout_and_metadata(tmp_path):
    """The canonical file is what A1111/kohya read (emb_params / clip_l+clip_g) plus our metadata strings."""
    sd1 = save_concept(random_concept("sd1"), tmp_path / "<thing>.safetensors")
    with safe_open(str(sd1), "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        meta = handle.metadata()
    assert meta["token"] == "<thing>" and meta["family"] == "sd1" and meta["base_model"] == "tiny-sd1"
    assert meta["init_text"] == "toy" and meta["steps"] == "42" and meta["created"] and meta["studio_version"]
    xl = save_concept(random_concept("sdxl"), tmp_path / "xl" / "<thing>.safetensors")
    with safe_open(str(xl), "pt") as handle:
        assert sorted(handle.keys()) == ["clip_g", "clip_l"]
        assert list(handle.get_tensor("clip_l").shape) == [3, 768]
        assert list(handle.get_tensor("clip_g").shape) == [3, 1280]


def test_a1111_pt_layout_opens_with_weights_only(tmp_path):
    written = save_concept(random_concept("sd1"), tmp_path / "<thing>", format="a1111")
    assert written.suffix == ".pt"
    data = torch.load(written, map_location="cpu", weights_only=True)
    assert data["string_to_token"] == {"*": 265} and data["name"] == "<thing>" and data["step"] == 42
    assert list(data["string_to_param"]["*"].shape) == [3, 768]
    assert data["sd_checkpoint_name"] == "tiny-sd1" and "sd_checkpoint" in data


def test_diffusers_sdxl_is_a_pair_of_files_and_either_half_loads_both(tmp_path):
    concept = random_concept("sdxl")
    first = save_concept(concept, tmp_path / "learned_embeds.safetensors", format="diffusers")
    second = tmp_path / "learned_embeds_2.safetensors"
    assert second.is_file()
    assert_same_vectors(concept, load_concept(first))
    from_second = load_concept(second)
    assert from_second.token == concept.token  # diffusers' default file name names no concept: the stored word does
    assert_same_vectors(concept, from_second)


def test_bare_tensor_file_reads_with_the_file_name_as_token(tmp_path):
    tensor = torch.randn(2, 1024)
    torch.save(tensor, tmp_path / "bare.pt")
    concept = load_concept(tmp_path / "bare.pt")
    assert concept.token == "bare" and concept.family == "sd2"
    assert torch.equal(concept.vectors["text_encoder"], tensor)


def test_wrong_suffix_for_format_is_a_clear_error(tmp_path):
    with pytest.raises(ConceptError, match=r"end in \.pt"):
        save_concept(random_concept("sd1"), tmp_path / "x.safetensors", format="a1111")
    with pytest.raises(ConceptError, match="unknown concept format"):
        save_concept(random_concept("sd1"), tmp_path / "x.safetensors", format="ckpt")


def test_png_with_sd_ti_embedding_chunk_reads(tmp_path):
    """A1111's picture form: base64 of JSON with tensors written as {"TORCHTENSOR": lists}."""
    from PIL.PngImagePlugin import PngInfo

    vectors = torch.randn(2, 768)
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": {"TORCHTENSOR": vectors.tolist()}},
            "name": "stored-name", "step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    path = tmp_path / "picture-concept.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    concept = load_concept(path)
    assert concept.token == "stored-name"  # A1111 names picture embeddings by the name inside
    assert load_concept(path, token="<pic>").token == "<pic>"
    assert concept.meta["steps"] == "500" and concept.dims == SD1
    assert torch.equal(concept.vectors["text_encoder"], vectors)

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ConceptError, match="sd-ti-embedding"):
        load_concept(plain)


# ----------------------------------------------------------------------------------------- diffusers interop


def _table_rows(tokenizer, text_encoder, token: str, n: int) -> torch.Tensor:
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    ids = tokenizer.convert_tokens_to_ids(names)
    return text_encoder.get_input_embeddings().weight[ids].detach()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_every_written_form_loads_in_diffusers_load_textual_inversion(tiny_model_dirs, tmp_path, family):
    """diffusers' own loader accepts our files and its embedding-table rows equal our vectors exactly."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dirs[family], safety_checker=None)
    for i, fmt in enumerate(FORMATS):
        token = f"<{fmt}-{family}>"
        concept = random_concept(family, token=token, seed=i)
        written = save_concept(concept, tmp_path / token, format=fmt)
        pipe.load_textual_inversion(str(written), token=token)
        rows = _table_rows(pipe.tokenizer, pipe.text_encoder, token, concept.n_vectors)
        assert torch.equal(rows, concept.vectors["text_encoder"]), fmt


def test_sdxl_written_forms_load_per_encoder_in_diffusers(tiny_model_dirs, tmp_path):
    """SDXL: diffusers pair files load by path; clip_l/clip_g files load per encoder as diffusers documents."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dirs["sdxl"])
    encoders = {"text_encoder": (pipe.text_encoder, pipe.tokenizer),
                "text_encoder_2": (pipe.text_encoder_2, pipe.tokenizer_2)}
    for i, fmt in enumerate(FORMATS):
        token = f"<{fmt}-xl>"
        concept = random_concept("sdxl", token=token, seed=10 + i)
        written = save_concept(concept, tmp_path / token, format=fmt)
        if fmt == "diffusers":
            second = written.with_name(written.stem + "_2.safetensors")
            sources = {"text_encoder": str(written), "text_encoder_2": str(second)}
        else:
            state = load_file(written)
            sources = {"text_encoder": state["clip_l"], "text_encoder_2": state["clip_g"]}
        for key, (encoder, tokenizer) in encoders.items():
            pipe.load_textual_inversion(sources[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
            assert torch.equal(_table_rows(tokenizer, encoder, token, 3), concept.vectors[key]), (fmt, key)


# ----------------------------------------------------------------------------------------------- wrong models


def test_sd1_concept_on_sd2_model_names_file_sizes_and_families(compat_dir):
    concept = load_concept(compat_dir / "bad-hands-5.pt")
    with pytest.raises(ConceptMismatchError) as caught:
        check_fits(concept, SD2)
    message = str(caught.value)
    assert "bad-hands-5.pt" in message and "2 vector" in message
    assert "trained for SD 1.x (768-d) but the model is SD 2.x (1024-d)" in message


def test_sd1_concept_on_sdxl_model_is_refused_for_missing_second_encoder():
    expected = r"SD 1\.x \(768-d\) but the model is SDXL \(768-d \+ 1280-d\).*text_encoder_2"
    with pytest.raises(ConceptMismatchError, match=expected):
        check_fits(random_concept("sd1"), SDXL, where="thing.safetensors")


def test_sdxl_concept_on_sd1_model_and_fitting_concepts():
    with pytest.raises(ConceptMismatchError, match="trained for SDXL"):
        check_fits(random_concept("sdxl"), SD1)
    for family, dims in FAMILY_DIMS.items():
        check_fits(random_concept(family), dims)  # no error


# --------------------------------------------------------------------------------------------- unsafe / broken


def test_pickle_with_an_object_is_refused_and_nothing_executes(tmp_path):
    """A .pt whose reduce would create a folder is refused by the weights-only loader; the folder never appears."""
    marker = tmp_path / "MARKER-pickle-code-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "name": Payload()}, path)
    with open(path, "rb") as handle:  # the payload really is in the file (a call to mkdir), unexecuted
        assert b"mkdir" in handle.read()
    with pytest.raises(ConceptError, match="never unpickle arbitrary objects"):
        load_concept(path)
    assert not marker.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_vectors_are_refused_naming_the_file(tmp_path, bad):
    vectors = torch.randn(2, 768)
    vectors[1, 5] = bad
    path = tmp_path / "diverged.safetensors"
    save_file({"emb_params": vectors}, path)
    with pytest.raises(ConceptError, match=r"diverged\.safetensors.*NaN or infinite"):
        load_concept(path)
    with pytest.raises(ConceptError, match="NaN or infinite"):
        save_concept(Concept("<nan>", {"text_encoder": vectors}), tmp_path / "out.safetensors")


def test_malformed_files_give_clear_errors(tmp_path):
    cases = {
        "junk.pt": b"this is not a torch file",
        "junk.safetensors": b"\x00\x01 not safetensors",
        "notes.txt": b"hello",
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ConceptError, match=name.replace(".", r"\.")):
            load_concept(tmp_path / name)
    save_file({"emb_params": torch.arange(768).reshape(1, 768)}, tmp_path / "ints.safetensors")
    with pytest.raises(ConceptError, match="float tensor"):
        load_concept(tmp_path / "ints.safetensors")
    save_file({"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}, tmp_path / "two.safetensors")
    with pytest.raises(ConceptError, match="unknown embedding layout"):
        load_concept(tmp_path / "two.safetensors")
    save_file({"emb_params": torch.zeros(2, 3, 768)}, tmp_path / "cube.safetensors")
    with pytest.raises(ConceptError, match="1-D or 2-D"):
        load_concept(tmp_path / "cube.safetensors")
    save_file({"clip_g": torch.zeros(2, 1280)}, tmp_path / "half-xl.safetensors")  # clip_l alone: SD1 pivotal words
    with pytest.raises(ConceptError, match="clip_l"):
        load_concept(tmp_path / "half-xl.safetensors")
    with pytest.raises(ConceptError, match="no such file"):
        load_concept(tmp_path / "missing.pt")


def test_atomic_write_leaves_no_temp_files_and_replaces_in_place(tmp_path):
    concept = random_concept("sd1")
    path = save_concept(concept, tmp_path / "<thing>.safetensors")
    save_concept(random_concept("sd1", seed=5), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["<thing>.safetensors"]
    assert not torch.equal(load_concept(path).vectors["text_encoder"], concept.vectors["text_encoder"])


def test_concept_validates_its_shape_and_token():
    assert ENCODER_KEYS == ("text_encoder", "text_encoder_2", "text_encoder_3")  # SD3: CLIP-L, CLIP-G, T5
    with pytest.raises(ConceptError, match="has spaces"):
        Concept("two words", {"text_encoder": torch.zeros(1, 768)})
    with pytest.raises(ConceptError, match="2-D float tensor"):
        Concept("<x>", {"text_encoder": torch.zeros(768)})
    with pytest.raises(ConceptError, match="different vector counts"):
        Concept("<x>", {"text_encoder": torch.zeros(1, 768), "text_encoder_2": torch.zeros(2, 1280)})
    concept = random_concept("sdxl", n=4)
    assert concept.n_vectors == 4 and concept.dims == SDXL and concept.family == "sdxl"


def test_two_sd1_files_named_x_and_x_2_stay_two_concepts(tmp_path):
    """Only a 768-d + 1280-d pair with one shared key is a diffusers SDXL pair; same-width files are separate."""
    save_file({"<tok>": torch.randn(1, 768)}, tmp_path / "style.safetensors")
    save_file({"<tok>": torch.randn(1, 768)}, tmp_path / "style_2.safetensors")
    assert load_concept(tmp_path / "style.safetensors").dims == SD1
    second = load_concept(tmp_path / "style_2.safetensors")
    assert second.dims == SD1 and second.token == "style_2"


def test_on_the_demo_model_a_real_sd1_file_is_named_as_such_with_what_would_load_it(tmp_path):
    """Guards 'on the demo model every real SD 1.x file is refused as unknown model (128-d)'."""
    with pytest.raises(ConceptMismatchError) as info:
        check_fits(random_concept("sd1"), {"text_encoder": 128}, where="hands.pt")
    message = str(info.value)
    assert "the model is the built-in demo model (128-d)" in message
    assert "load an SD 1.x model in the Model tab" in message and "--model" in message

"""A pivotal concept is one thing to the user: its word brings the LoRA learned with it.

Guards two bugs of the studio's own pivotal files (`--method pivotal`, both forms it writes: diffusers' LoRA with a
`<name>_emb.safetensors` words file beside, and kohya's one file with the word bundled): the Library listed them as
"does not fit: a LoRA for demo, but the model demo is sd1" (it judged LoRAs by the architecture's family, generation
by the encoders' widths), so no picker offered them; and a prompt that wrote the word alone drew plain words with a
"No concept called" warning until `<lora:name:1>` was written too. Tiny pivotal runs (4 steps) on the demo model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.lora import LoraFile
from studio.engine.learned.lora_files import load_lora
from studio.engine.learned.word import ConceptError
from studio.engine.models import ModelManager
from studio.errors import LoraError
from studio.jobs.generation import request_for
from studio.library import ConceptLibrary
from studio.training import TrainConfig, Trainer
from studio.ui.state import Studio

REPO = Path(__file__).resolve().parents[1]
PICTURES = REPO / "assets" / "concepts" / "toy-plum"
FORMATS = {"diffusers": "<plum-piv>", "kohya": "<plum-k>"}  # the form written -> the word trained
PROMPT = "{word} on a black background"
SESSION = "browser-pivotal-test"


@pytest.fixture(scope="module")
def manager(demo_model_dir) -> ModelManager:
    manager = ModelManager()
    manager.load(demo_model_dir)
    return manager


@pytest.fixture(scope="module")
def demo(manager):
    return manager.current


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory) -> dict[str, Path]:
    """The LoRA file of a 4-step pivotal run in each form, in a folder of their own (the uploads of a session)."""
    folder = tmp_path_factory.mktemp("trained")
    files = {}
    for form, word in FORMATS.items():
        cfg = TrainConfig(word, init_text="toy", steps=4, batch_size=2, seed=1, method="pivotal", unet_lr=2e-2,
                          rank=2, lora_format=form, stop_when_learned=False)
        files[form] = folder / f"{word.strip('<>')}.safetensors"
        Trainer(demo, cfg, PICTURES, files[form]).run()
    assert (folder / "plum-piv_emb.safetensors").is_file() and not (folder / "plum-k_emb.safetensors").exists()
    return files


@pytest.fixture()
def library(trained, tmp_path) -> ConceptLibrary:
    """A shared library folder holding both pivotal files as the studio wrote them, plus a session folder."""
    root = tmp_path / "concepts"
    root.mkdir()
    for path in trained["diffusers"].parent.glob("*.safetensors"):
        (root / path.name).write_bytes(path.read_bytes())
    return ConceptLibrary(root, watch=False, sessions_dir=tmp_path / "sessions")


def _picture(demo, req: GenerateRequest) -> np.ndarray:
    return np.asarray(generate(demo, req).images[0], dtype=np.int16)


def _fields(prompt: str) -> dict:
    return {"prompt": prompt, "seed": 5, "steps": 4, "preview_every": 0}


@pytest.mark.parametrize("form", FORMATS)
def test_the_library_and_the_pickers_offer_the_studios_pivotal_files_on_the_demo_model(manager, library, trained,
                                                                                      tmp_path, form):
    """Was: "does not fit: a LoRA for demo, but the model demo is sd1", and missing from every picker."""
    word, name = FORMATS[form], trained[form].stem
    library.add_session_lora(SESSION, trained[form])  # what the Train tab does with a run's result
    studio = Studio(manager, library, work_dir=tmp_path / "work")
    rows = [e for e in studio.entries(SESSION) if e.token == name]
    assert [(e.kind, e.session is None) for e in rows] == [("word+lora", False), ("word+lora", True)]
    assert all(e.fits for e in rows), [e.reason for e in rows]
    assert rows[1].reason == "this session has its own LoRA with this name, which is used instead"
    assert (f"{name} (word+lora)", word) in studio.concept_choices(SESSION)  # picking it writes the word


def test_the_library_judges_a_lora_by_the_rule_generation_refuses_it_by(manager, demo, library, tmp_path):
    """One fit rule: a LoRA made for SD 1.x (768-wide cross-attention) is listed as not fitting the demo model with
    the very line a request for it raises, and is offered by no picker."""
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{module}.lora_A.weight": torch.zeros(2, 768), f"{module}.lora_B.weight": torch.zeros(32, 2)},
              library.root / "sd15-style.safetensors")
    studio = Studio(manager, library, work_dir=tmp_path / "work")
    entry, = [e for e in studio.entries(SESSION) if e.token == "sd15-style"]
    with pytest.raises(LoraError) as refused:
        generate(demo, GenerateRequest("a toy", concepts=[(entry.lora, 1.0)], steps=1))
    assert not entry.fits and entry.reason == str(refused.value)
    assert "a LoRA for sd1, but the model" in entry.reason
    assert not any("sd15-style" in label for label, _ in studio.concept_choices(SESSION))


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("session", [None, SESSION], ids=["shared-library", "session"])
def test_the_word_alone_resolves_to_its_vectors_and_its_lora(library, trained, form, session):
    word, name = FORMATS[form], trained[form].stem
    if session is not None:
        added = library.add_session_lora(session, trained[form])
        assert added.path.parent != trained[form].parent  # the session's own copy
    found = library.resolve(PROMPT.format(word=word), session)
    assert [type(item).__name__ for item in found] == ["Concept", "tuple"], found
    concept, (lora, weight) = found
    assert isinstance(lora, LoraFile) and weight == 1.0 and lora.name == name
    assert concept.token == word and concept is lora.words[0]  # the word learned with this very LoRA
    assert lora is library.lora(name, session)
    # A tag sets the weight and names the file once.
    (again, (tagged, tag_weight)) = library.resolve(f"{word} <lora:{name}:0.5> on black", session)
    assert again is concept and tagged is lora and tag_weight == 0.5
    req, unknown = request_for(_fields(PROMPT.format(word=word)), library, session)
    assert unknown == [] and req.words == [concept] and req.loras == [(lora, 1.0)]


def test_a_pivotal_word_in_the_negative_prompt_gives_its_vectors_and_not_its_lora(library):
    """A LoRA changes the whole picture, so only the prompt applies it."""
    req, unknown = request_for({**_fields("a red toy"), "negative_prompt": "<plum-piv>"}, library, None)
    assert [c.token for c in req.words] == ["<plum-piv>"] and req.loras == [] and unknown == []


def test_the_word_of_a_pivotal_file_is_no_concept_of_its_own(library):
    """`get` (the Evaluate and Library tabs' look-up of one concept) says how the word is used rather than hand out
    vectors that were learned with weights it would leave out."""
    with pytest.raises(ConceptError, match=r"the word of the LoRA plum-piv \(plum-piv.safetensors\)"):
        library.get("<plum-piv>")


@pytest.mark.parametrize("form", FORMATS)
def test_the_word_draws_what_the_word_and_its_tag_draw_and_not_what_the_word_alone_draws(demo, library, trained,
                                                                                         form):
    word, name = FORMATS[form], trained[form].stem
    alone, _ = request_for(_fields(PROMPT.format(word=word)), library, None)
    tagged, _ = request_for(_fields(f"{word} <lora:{name}:1> on a black background"), library, None)
    picture = _picture(demo, alone)
    assert np.array_equal(picture, _picture(demo, tagged))
    without_lora = GenerateRequest(PROMPT.format(word=word), concepts=alone.words, seed=5, steps=4,
                                   preview_every=0)
    assert np.abs(picture - _picture(demo, without_lora)).max() > 0, "the LoRA was not applied"
    # An explicit weight is the weight: once, not added to the word's 1.0.
    half, _ = request_for(_fields(f"{word} <lora:{name}:0.5> on a black background"), library, None)
    once = GenerateRequest(PROMPT.format(word=word), concepts=[*alone.words, (alone.loras[0][0], 0.5)],
                           seed=5, steps=4, preview_every=0)
    assert np.array_equal(_picture(demo, half), _picture(demo, once))


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMATS)
def test_the_cli_draws_the_word_with_its_lora_and_warns_of_nothing(demo, trained, tmp_path, form):
    """`studio generate --concept PIVOTAL.safetensors --prompt "<w> on a black background"`; for the diffusers form
    its `_emb` words file stands for the pair too."""
    word, path = FORMATS[form], trained[form]
    given = [path] + ([path.with_name(f"{path.stem}_emb.safetensors")] if form == "diffusers" else [])
    lora = load_lora(path)
    expected = _picture(demo, GenerateRequest(PROMPT.format(word=word), concepts=[(lora, 1.0)], seed=5, steps=4))
    for k, concept in enumerate(given):
        out = tmp_path / f"{k}.png"
        done = subprocess.run([sys.executable, "-m", "studio", "generate", "--model", "assets/demo-model",
                               "--concept", str(concept), "--prompt", PROMPT.format(word=word), "--seed", "5",
                               "--steps", "4", "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        assert "warn" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
        assert np.array_equal(np.asarray(Image.open(out).convert("RGB"), dtype=np.int16), expected), concept.name
        assert f"Concepts: {word}" in Image.open(out).info["parameters"]

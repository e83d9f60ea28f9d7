"""Library and Model tabs through a real server: uploads stay in their session, files that do not fit say why,
rename / thumbnail / save / delete, and memory modes that apply to the loaded model."""

import dataclasses

import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from studio.engine.learned.registry import save_concept
from studio.engine.learned.word import Concept
from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import build_app
from studio.ui.operator import Operator
from studio.ui.state import Studio
from studio.ui.tabs.model import describe
from ui_server import launch

OPERATOR_TOKEN = "the-operators-own-secret"


def png_parameters(path) -> str:
    return Image.open(path).info.get("parameters", "")


def concept_file(folder, token: str, width: int, n_vectors: int = 1) -> str:
    torch.manual_seed(0)
    path = save_concept(Concept(token, {"text_encoder": torch.randn(n_vectors, width)}, {}), folder / token.strip("<>"))
    return str(path)


def rows(client: Client) -> dict[str, list]:
    table = client.predict(api_name="/library")
    return {r[0]: r for r in table["data"]}


def generate(client: Client, prompt: str) -> str:
    gallery = client.predict(prompt, "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")
    return png_parameters(gallery[0]["image"])


def test_an_upload_stays_in_its_session_and_a_misfit_says_why(studio_server, tmp_path):
    url, _, _ = studio_server
    mine, other = Client(url, verbose=False), Client(url, verbose=False)
    files = [concept_file(tmp_path, "<fits>", 768, 2), concept_file(tmp_path, "<too-wide>", 1024)]
    report, _ = mine.predict([handle_file(f) for f in files], api_name="/import_concepts")
    assert "added <fits> to this session" in report
    assert "added <too-wide>" in report and "does not fit" in report and "1024" in report and "768" in report

    listed = rows(mine)
    assert listed["<fits>"][1:3] == [2, True] and listed["<fits>"][4] == "this session"
    assert listed["<too-wide>"][2] is False and "1024" in listed["<too-wide>"][3]
    assert "Concepts: <fits>" in generate(mine, "a photo of <fits>")
    with pytest.raises(Exception, match="trained for"):
        generate(mine, "a photo of <too-wide>")

    assert "<fits>" not in rows(other) and "<too-wide>" not in rows(other)  # another session sees neither
    assert "Concepts:" not in generate(other, "a photo of <fits>")


def test_rename_thumbnail_save_for_everyone_then_delete(studio_server, tmp_path):
    url, _, root = studio_server
    mine, other = Client(url, verbose=False), Client(url, verbose=False)
    mine.predict([handle_file(concept_file(tmp_path, "<old-name>", 768))], api_name="/import_concepts")
    report, token = mine.predict("<old-name>", "<new-name>", api_name="/rename_concept")
    assert token == "<new-name>" and "<old-name>" not in rows(mine)
    assert "Concepts: <new-name>" in generate(mine, "a photo of <new-name>")

    thumbs = mine.predict("<new-name>", api_name="/preview_concept")
    assert [t["caption"] for t in thumbs] == ["<new-name>"]

    assert "every user" in mine.predict("<new-name>", api_name="/save_concept")
    assert [p.name for p in root.iterdir()] == ["new-name.safetensors"]  # file-safe; the word is inside
    assert rows(other)["<new-name>"][4].endswith("new-name.safetensors")  # now shared

    report, _ = other.predict("<new-name>", api_name="/delete_concept")
    assert report == "deleted <new-name>" and list(root.iterdir()) == []
    assert "<new-name>" not in rows(mine)
    with pytest.raises(Exception, match="no concept named"):
        other.predict("<new-name>", api_name="/delete_concept")


def test_two_users_saving_one_word_never_replace_each_other_and_errors_read_as_written(studio_server, tmp_path):
    """Guards the silent overwrite ('the second replaces the first one's file and is told every user can use it'),
    the rename that lost the concept on a bad word, and errors reaching API clients HTML-escaped (&lt;c1&gt;)."""
    url, _, root = studio_server
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    for client, folder in ((first, tmp_path / "a"), (second, tmp_path / "b")):
        folder.mkdir()
        client.predict([handle_file(concept_file(folder, "<c1>", 768))], api_name="/import_concepts")
    assert "every user" in first.predict("<c1>", api_name="/save_concept")
    before = (root / "c1.safetensors").read_bytes()
    with pytest.raises(Exception, match=r"'<c1>' is already in the shared library \(c1.safetensors\)"):
        second.predict("<c1>", api_name="/save_concept")  # raw text, not &lt;c1&gt;
    assert (root / "c1.safetensors").read_bytes() == before and "<c1>" in rows(second)  # nothing lost
    assert "as <c1-2>" in second.predict("<c1>", "keep both", api_name="/save_concept")
    assert sorted(p.name for p in root.iterdir()) == ["c1-2.safetensors", "c1.safetensors"]

    second.predict([handle_file(concept_file(tmp_path / "b", "<mine>", 768))], api_name="/import_concepts")
    for bad in ("two words", ""):
        with pytest.raises(Exception, match="spaces|empty"):
            second.predict("<mine>", bad, api_name="/rename_concept")
        assert "<mine>" in rows(second)
    second.predict("<mine>", "../../evil", api_name="/rename_concept")  # a word may look like a path ...
    assert "every user" in second.predict("../../evil", api_name="/save_concept")
    assert sorted(p.name for p in root.iterdir()) == ["c1-2.safetensors", "c1.safetensors", "evil.safetensors"]
    assert not (root.parent / "evil.safetensors").exists() and not (root.parent.parent / "evil.safetensors").exists()
    for name in ("c1.safetensors", "c1-2.safetensors", "evil.safetensors"):  # ... but its file stays inside
        (root / name).unlink()


def test_memory_mode_reloads_the_model_with_its_settings_and_bad_input_is_explained(tiny_model_dirs, tmp_path):
    """Through a studio whose operator gave a token (memory mode and models are the operator's: test_operator_roles)
    and listed a model that is not there."""
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    operator = Operator(token=OPERATOR_TOKEN, models={"tiny": str(tiny_model_dirs["sd1"]), "gone": "not/a/model/path"})
    app = build_app(manager, ConceptLibrary(tmp_path), operator=operator)
    client = Client(launch(app), verbose=False)
    try:
        info = client.predict("low-vram", OPERATOR_TOKEN, api_name="/set_memory_mode")
        assert "low-vram" in info and "Family **sd1**" in info
        assert manager.options.vae_slicing and manager.options.attention_slicing
        assert manager.current.pipe.vae.use_slicing and manager.current.pipe.vae.use_tiling
        assert generate(client, "a red circle").startswith("a red circle")
        client.predict("fast", OPERATOR_TOKEN, api_name="/set_memory_mode")
        assert not manager.current.pipe.vae.use_slicing

        with pytest.raises(Exception, match="not in the list of choices"):
            client.predict("huge", OPERATOR_TOKEN, api_name="/set_memory_mode")
        with pytest.raises(Exception, match="no model at"):  # the operator's own list: the operator is told
            client.predict("gone", OPERATOR_TOKEN, api_name="/load_model")
        assert generate(client, "a red circle").startswith("a red circle")
    finally:
        app.close()


def test_the_model_text_says_the_demo_is_loaded(tiny_model_dirs, tmp_path):
    manager = ModelManager()
    manager.current = dataclasses.replace(manager.load(tiny_model_dirs["sd1"]), is_demo=True)
    text = describe(Studio(manager, ConceptLibrary(tmp_path)))
    assert text.startswith("**The built-in demo model is loaded**") and "auto → fast" in text


def test_a_closed_page_frees_memory_and_its_browser_finds_its_concepts_again(tiny_model_dirs, tmp_path):
    """Guards the app's `unload` hook both ways: a closed page's training view, thumbnails and flags go, and its
    concepts leave memory, but a reload (a new page of the same browser session) reads them back from disk."""
    from types import SimpleNamespace

    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    studio = Studio(manager, ConceptLibrary(tmp_path / "lib"), work_dir=tmp_path / "work")
    pages = {name: SimpleNamespace(session_hash=name, headers={}) for name in ("page-a", "page-b", "page-a2")}
    kept_a = studio.attach(pages["page-a"], None)  # a new browser: a new id, signed, for it to keep
    kept_b = studio.attach(pages["page-b"], "../../not-an-id")  # an id we could not have made: a new one
    browser_a, browser_b = studio.session_of(pages["page-a"]), studio.session_of(pages["page-b"])
    assert browser_a != browser_b and kept_a.startswith(f"{browser_a}.") and kept_b.startswith(f"{browser_b}.")
    assert "/" not in kept_b
    for page, session in (("page-a", browser_a), ("page-b", browser_b)):
        studio.library.add_session_concept(session, Concept("<c>", {"text_encoder": torch.zeros(1, 768)}, {}))
        studio.session(pages[page]).thumbnails["<c>"] = tmp_path / "c.png"
        studio.session(pages[page]).training = object()
        studio.session(pages[page]).cancel_flag("train")
    studio.detach(pages["page-a"])
    assert list(studio.sessions) == [browser_b]  # its thumbnails, training view and flags went with it
    assert studio.sessions.get(browser_b).thumbnails == {"<c>": tmp_path / "c.png"}
    assert browser_a not in studio.library._sessions  # memory freed
    assert studio.attach(pages["page-a2"], kept_a) == kept_a  # the reloaded page of browser A
    assert studio.concept_choices(studio.session_of(pages["page-a2"])) == [("<c>", "<c>")]
    assert studio.sessions.get("../../x").folder.parent == (tmp_path / "work").resolve()

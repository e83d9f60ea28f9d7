"""Operator and user roles (issue 23): what changes the server for everyone (the model, its memory mode, the CLIP model
an evaluation loads) is refused to anonymous clients, whose refusals tell nothing about the server's paths; the
operator switches among the listed models with the token only; a local studio's own page may type any model."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import build_app
from studio.ui.operator import SWITCHING_OFF, WRONG_TOKEN, Operator, parse_models
from studio.ui.state import Studio
from studio.ui.tabs.evaluate import clip_source_for
from studio.ui.tabs.model import load_model
from ui_server import launch

REPO = Path(__file__).resolve().parents[2]
TOKEN = "operator-secret-for-tests"


def refusal(client: Client, *args, api_name: str) -> str:
    """The one-line error an endpoint answers `args` with."""
    with pytest.raises(Exception) as refused:
        client.predict(*args, api_name=api_name)
    return str(refused.value)


@pytest.fixture
def launched_studio(demo_model_dir, tmp_path):
    """`python launch.py --port P --concepts DIR --data DIR`, the command issue 23's checks start; its URL once it
    says it is serving."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("STUDIO_ADMIN_TOKEN", "STUDIO_MODELS", "SPACE_ID")}
    process = subprocess.Popen([sys.executable, "launch.py", "--port", str(port), "--concepts", str(tmp_path / "lib"),
                                "--data", str(tmp_path / "data")], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        said = []
        for line in process.stdout:  # ends when the process does
            said.append(line)
            if "Running on local URL" in line:
                break
        assert process.poll() is None, "".join(said)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_studio_started_without_the_operator_option_refuses_every_switch_alike(launched_studio, tiny_model_dirs,
                                                                                   tmp_path):
    """Guards 'anyone switches the model for everyone' and its path oracle ("must be .safetensors or .ckpt" vs "no
    model at"): every /load_model from a gradio_client gets the same line, whether its path exists or not."""
    client = Client(launched_studio, verbose=False)
    plain_file = tmp_path / "notes.txt"
    plain_file.write_text("not a model")
    asked = [str(tiny_model_dirs["sd1"]), str(plain_file), str(tmp_path / "none.safetensors"), "/no/such/folder",
             "stabilityai/stable-diffusion-xl-base-1.0", "demo", ""]
    answers = {refusal(client, source, "", api_name="/load_model") for source in asked}
    assert answers == {SWITCHING_OFF}  # one line, the same for every path: it tells nothing of the server's files
    assert refusal(client, "low-vram", api_name="/set_memory_mode") == SWITCHING_OFF
    assert refusal(client, "fast", "a guessed token", api_name="/set_memory_mode") == SWITCHING_OFF

    # The evaluation's CLIP model: the built-in list only, refused before anything is loaded or looked up.
    folder = str(tiny_model_dirs["sd1"])
    said = refusal(client, "<any>", 1, folder, "none", "object", "", 2, 0, [], api_name="/evaluate_concept")
    assert "is not a CLIP model this studio offers" in said and "openai/clip-vit-base-patch32" in said


@pytest.fixture(scope="module")
def operator_server(tiny_model_dirs, tmp_path_factory):
    """`(url, manager)`: a studio whose operator listed two models and gave a token (as `launch.py --admin-token`)."""
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    listed = {"first": str(tiny_model_dirs["sd1"]), "second": str(tiny_model_dirs["sd2"])}
    operator = Operator(token=TOKEN, models=listed)
    app = build_app(manager, ConceptLibrary(tmp_path_factory.mktemp("operator-library")), operator=operator)
    yield launch(app), manager
    app.close()


def test_the_operator_switches_among_the_listed_models_with_the_token_only(operator_server, tiny_model_dirs):
    url, manager = operator_server
    client = Client(url, verbose=False)
    first, second = str(tiny_model_dirs["sd1"]), str(tiny_model_dirs["sd2"])
    for token in ("", "operator-secret-for-test", TOKEN + "x"):
        assert refusal(client, "second", token, api_name="/load_model") == WRONG_TOKEN
        assert refusal(client, "low-vram", token, api_name="/set_memory_mode") == WRONG_TOKEN
    said = refusal(client, second, TOKEN, api_name="/load_model")  # a path, even a listed one's: names only
    assert "is not one of this studio's models: pick one of first, second" in said
    assert manager.current.source == first

    info = client.predict("second", TOKEN, api_name="/load_model")
    assert manager.current.source == second and manager.current.family == "sd2"
    assert "**Loaded:** `second`" in info and second not in info  # the Model tab names it, never by its path
    info = client.predict("low-vram", TOKEN, api_name="/set_memory_mode")
    assert "low-vram" in info and manager.current.pipe.vae.use_slicing
    client.predict("fast", TOKEN, api_name="/set_memory_mode")
    client.predict("first", TOKEN, api_name="/load_model")
    assert manager.current.source == first


def test_a_model_fine_tuned_in_a_session_is_a_choice_of_that_session(operator_server, concept_pictures):
    """The DreamBooth result names its model instead of its folder; the Model tab loads it by that name."""
    url, manager = operator_server
    client = Client(url, verbose=False)
    status, _ = client.predict(files=[handle_file(p) for p in concept_pictures], token="<tuned>", init="toy",
                               kind="object", vectors=1, steps=1, lr=0.005, batch=1, preview_every=0,
                               method="dreambooth", api_name="/train")
    assert "“tuned (trained in this session)” in the Model tab" in status
    assert "not one of this studio's models" in refusal(Client(url, verbose=False), "trained:tuned", TOKEN,
                                                         api_name="/load_model")  # another session has no such model
    before = manager.current.source
    info = client.predict("trained:tuned", TOKEN, api_name="/load_model")
    assert "**Loaded:** `tuned`" in info and Path(manager.current.source).name == "tuned"
    client.predict("first", TOKEN, api_name="/load_model")
    assert manager.current.source == before


def test_a_local_studios_own_page_may_type_any_model_but_a_script_may_not(tiny_model_dirs, tmp_path):
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    studio = Studio(manager, ConceptLibrary(tmp_path / "library"), work_dir=tmp_path / "work")
    local = Operator.for_server("127.0.0.1", share=False, startup_model=str(tiny_model_dirs["sd1"]))
    assert local.local and local.switching and list(local.models) == ["demo", "sd1"]
    page = gr.Request(session_hash="page", headers={})  # the studio's own page: no x-gradio-user header
    script = gr.Request(session_hash="script", headers={"x-gradio-user": "api"})  # what gradio_client sends

    info = load_model(studio, local, "page", str(tiny_model_dirs["sd2"]), None, page)
    assert manager.current.family == "sd2" and "**Loaded:** `sd2`" in info
    with pytest.raises(gr.Error, match="Switching the model is off on this server"):
        load_model(studio, local, "script", str(tiny_model_dirs["sd1"]), None, script)
    assert manager.current.family == "sd2"
    assert clip_source_for(local, "some/clip-folder", page) == "some/clip-folder"
    with pytest.raises(gr.Error, match="is not a CLIP model this studio offers"):
        clip_source_for(local, "some/clip-folder", script)


def test_who_may_switch_is_decided_by_where_the_studio_is_served(monkeypatch, tmp_path):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not Operator.for_server("0.0.0.0", share=False).switching  # reachable by others: off without a token
    assert not Operator.for_server("127.0.0.1", share=True).switching  # a gradio.live link: public
    with_token = Operator.for_server("0.0.0.0", share=False, token=TOKEN, models={"sd15": "sd15/id"},
                                     startup_model="/models/mine.safetensors")
    assert with_token.switching and not with_token.local and TOKEN not in repr(with_token)
    assert with_token.models == {"sd15": "sd15/id", "mine.safetensors": "/models/mine.safetensors"}
    assert not Operator.for_server("127.0.0.1", share=False, token=TOKEN).local  # a token is asked everywhere
    with pytest.raises(ValueError, match="at least 12"):
        Operator.for_server("0.0.0.0", share=False, token="short")
    monkeypatch.setenv("SPACE_ID", "someone/concept-studio")
    assert not Operator.for_server("127.0.0.1", share=False).switching  # a Space is public whatever its host

    assert parse_models("demo=, sd15 = stable-diffusion-v1-5/stable-diffusion-v1-5") == {
        "demo": "", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    listed = tmp_path / "models.txt"
    listed.write_text("# the operator's models\ndemo=\n\nmine=/models/mine.safetensors\n")
    assert parse_models(str(listed)) == {"demo": "", "mine": "/models/mine.safetensors"}
    for bad, says in (("a/b=x", "write name=source"), ("x=1,x=2", "twice"), ("no-such-file.txt", "name=source")):
        with pytest.raises(ValueError, match=says):
            parse_models(bad)

"""Sessions that cannot be taken, through a real server, the way the reporter of issue 23 took one: the page's hidden
attach function called by raw HTTP (`queue/join` with its fn_index) with a victim's session id, bare, with a wrong
signature or signed with the secret every page's config publishes, or a client naming the victim's id as its own
session hash; then `/library` must show nothing of the victim's. And no message shows a session id or a server path:
the DreamBooth result, the Library's source column and details."""

import hashlib
import hmac
import json

import httpx
import pytest
import torch
from gradio_client import Client, handle_file

from studio.engine.learned.registry import save_concept
from studio.engine.learned.word import Concept
from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import SESSION_STORAGE_KEY, build_app
from ui_server import launch

SECRET_WORD = "<victims-secret>"


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    """`(url, fn_index of each private function by name, library root, work folder)` of a studio on the tiny SD1
    model."""
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    data = tmp_path_factory.mktemp("takeover-data")
    root = data / "library"
    app = build_app(manager, ConceptLibrary(root, sessions_dir=data / "sessions"), work_dir=data / "work")
    private = {getattr(fn.fn, "__name__", ""): index for index, fn in app.fns.items() if fn.api_visibility == "private"}
    yield launch(app), private, root, data / "work"
    app.close()


def run_private(url: str, fn_index: int, session_hash: str, *data: object) -> object:
    """Call a page's private function as its page does, by raw HTTP (Gradio's client libraries refuse them): join
    the queue with its fn_index; its first output."""
    with httpx.Client(base_url=url, timeout=60) as http:
        joined = http.post("gradio_api/queue/join", json={"data": list(data), "fn_index": fn_index, "event_data": None,
                                                         "session_hash": session_hash, "trigger_id": None})
        joined.raise_for_status()
        event_id = joined.json()["event_id"]
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
            for line in stream.iter_lines():
                message = json.loads(line[len("data:"):]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                    assert message["success"], message
                    return message["output"]["data"][0]
    raise AssertionError(f"function {fn_index} never completed")


def attach(url: str, private: dict[str, int], session_hash: str, kept: object) -> object:
    """What a page does when it opens: the attach function with the value its localStorage holds; the value the
    server gives back to keep."""
    return run_private(url, private["attach"], session_hash, kept)


def listed(client: Client) -> dict[str, list]:
    return {row[0]: row for row in client.predict(api_name="/library")["data"]}


def published_secret(url: str) -> str:
    """gr.BrowserState's `secret` as every visitor reads it in the page config."""
    config = httpx.get(f"{url}config", timeout=30).json()
    props = [c.get("props", {}) for c in config["components"]]
    (state,) = [p for p in props if p.get("storage_key") == SESSION_STORAGE_KEY]
    return state["secret"]


def test_a_victims_session_id_bare_or_forged_gets_a_stranger_nothing_of_the_victims(server, tmp_path):
    """Guards the takeover of issue 23: queue/join with the attach fn_index and a victim's plain id, then /library
    listed the victim's concepts."""
    url, private, _, _ = server
    victim = Client(url, verbose=False)
    kept = attach(url, private, victim.session_hash, None)  # a new browser: a new session
    word = save_concept(Concept(SECRET_WORD, {"text_encoder": torch.randn(1, 768)}, {}), tmp_path / "secret")
    victim.predict([handle_file(str(word))], api_name="/import_concepts")
    assert SECRET_WORD in listed(victim)
    victim_id = str(kept).split(".")[0]

    signed_publicly = hmac.new(published_secret(url).encode(), victim_id.encode(), hashlib.sha256).hexdigest()
    forgeries = {
        "the bare id": victim_id,
        "a wrong signature": f"{victim_id}.{'0' * 64}",
        "an empty signature": f"{victim_id}.",
        "signed with the page config's secret": f"{victim_id}.{signed_publicly}",
        "the signed id with more after it": f"{kept}x",
    }
    for what, value in forgeries.items():
        stranger = Client(url, verbose=False)
        given = str(attach(url, private, stranger.session_hash, value))
        assert given.split(".")[0] != victim_id, f"{what}: the stranger was given the victim's session"
        assert SECRET_WORD not in listed(stranger), f"{what}: the stranger sees the victim's concept"

    stranger = Client(url, verbose=False)
    stranger.session_hash = victim_id  # a client names its own session hash: the victim's id gets it nothing
    assert SECRET_WORD not in listed(stranger)

    reloaded = Client(url, verbose=False)  # the victim's own browser, after a reload: a new page, the kept value
    assert attach(url, private, reloaded.session_hash, kept) == kept
    assert SECRET_WORD in listed(reloaded)


def test_no_message_shows_a_session_id_or_a_server_path(server, tmp_path, concept_pictures):
    """Guards the DreamBooth result that printed the session's folder (with its id), and the Library's source column
    and details that showed the library file's absolute path."""
    url, private, root, work = server
    client = Client(url, verbose=False)
    session_id = str(attach(url, private, client.session_hash, None)).split(".")[0]
    status, download = client.predict(files=[handle_file(p) for p in concept_pictures], token="<db-box>", init="toy",
                                      kind="object", vectors=1, steps=2, lr=0.005, batch=1, preview_every=0,
                                      method="dreambooth", api_name="/train")
    assert "fine-tuned model “db-box”" in status and "Model tab" in status and download is None
    assert session_id not in status and str(work) not in status and str(tmp_path.anchor) + "tmp" not in status

    (root / "styles").mkdir(parents=True, exist_ok=True)
    save_concept(Concept("<shared-word>", {"text_encoder": torch.randn(1, 768)}, {}), root / "styles" / "shared-word")
    client.predict(api_name="/library")  # the library sees the new file
    rows = listed(client)
    assert rows["<shared-word>"][4] == "styles/shared-word.safetensors"
    for row in rows.values():
        assert str(root) not in str(row[4]) and session_id not in str(row[4]), row
    about = run_private(url, private["show_picked"], client.session_hash, "<shared-word>")
    assert "`styles/shared-word.safetensors`" in about and str(root) not in about

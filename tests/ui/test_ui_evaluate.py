"""Evaluate tab through a real server on the built-in demo model: a bundled concept set's concept is scored by the
judge (each as `mean ± half-width (n=pictures)` in [0, 1], beside the plain-words baseline and their margin) with the
pictures they came from; a concept with nothing to
score it against says what to configure instead of failing with a traceback."""

import re

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from studio.demo.concept_sets import load_concept_set
from studio.engine.concepts import save_concept
from studio.engine.models import ModelManager
from studio.evaluation.denoising import initial_concept
from studio.library import ConceptLibrary
from studio.ui.app import build_app
from ui_server import UNetCalls, launch, wait_until_running


@pytest.fixture(scope="module")
def demo_server(demo_model_dir, tmp_path_factory):
    """A studio on the demo model whose shared library holds <purple-star> (its set's word, started from "star",
    untrained: scoring needs a concept, not a good one) and <no-truth> (a word no bundled set has)."""
    manager = ModelManager()
    model = manager.load(None)
    root = tmp_path_factory.mktemp("evaluate-library")
    concept = initial_concept(model, load_concept_set("purple-star"))
    save_concept(concept, root / concept.token)  # the library names files by their word
    concept.token = "<no-truth>"
    save_concept(concept, root / concept.token)
    app = build_app(manager, ConceptLibrary(root))
    by_name = {fn.api_name: fn for fn in app.fns.values()}
    assert by_name["evaluate_concept"].concurrency_id == "gpu"  # waits in the one GPU queue
    assert by_name["cancel_evaluation"].concurrency_limit is None  # ... and its Cancel does not
    yield launch(app), manager
    app.close()


def evaluate(client: Client, token: str, clip: str = "", ground_truth: str = "auto (the set whose word it is)"):
    # token, pictures per prompt, CLIP model, ground truth, kind, plain words, steps, first seed, training pictures
    return client.predict(token, 1, clip, ground_truth, "object", "", 4, 0, [], api_name="/evaluate_concept")


def test_a_bundled_sets_concept_gets_judge_scores_in_0_1_and_the_pictures_they_came_from(demo_server):
    about, table, grid = evaluate(Client(demo_server[0], verbose=False), "<purple-star>")
    rows = {row[0]: row for row in table["data"]}
    assert {"reconstruction", "prompt fidelity"} <= set(rows)
    for row in table["data"]:
        for value in row[1:3]:  # with the word, with plain words
            mean, half, n = re.fullmatch(r"(-?\d\.\d\d) ± (\d\.\d\d) \(n=(\d+)\)", value).groups()
            assert -1.0 <= float(mean) <= 1.0 and float(half) <= 1.0 and int(n) >= 1, row  # identity: a cosine
    assert rows["reconstruction"][1].endswith("(n=3)")  # 3 prompts x 1 picture
    assert re.fullmatch(r"[+-]\d\.\d\d ± \d\.\d\d \(n=3\)", rows["reconstruction"][3])  # the paired margin
    assert "purple-star" in rows["reconstruction"][4] and "shape star" in rows["reconstruction"][4]
    assert "`<purple-star>`" in about and "judge" in about and "purple star" in about

    # 3 reconstruction + 6 edit prompts, for the word and for the plain words, one picture each.
    assert len(grid) == 18
    captions = [item["caption"] for item in grid]
    assert captions[0] == "a photo of a <purple-star> (seed 0)" and "a photo of a purple star (seed 0)" in captions
    for item in grid:
        assert Image.open(item["image"]).size == (64, 64)


def test_nothing_to_score_against_says_what_to_configure(demo_server):
    client = Client(demo_server[0], verbose=False)
    with pytest.raises(Exception, match="has no ground truth.*purple-star.*CLIP model"):
        evaluate(client, "<no-truth>")
    with pytest.raises(Exception, match="could not load the CLIP model 'no/such-clip'"):
        evaluate(client, "<no-truth>", clip="no/such-clip")
    about, table, _ = evaluate(client, "<no-truth>", ground_truth="purple-star")  # the server kept running
    assert table["data"][0][0] == "reconstruction" and "ground truth of purple-star" in about


def test_on_the_demo_model_the_training_pictures_give_the_judge_its_ground_truth(demo_server):
    pictures = [handle_file(str(p)) for p in load_concept_set("purple-star").images]
    about, table, grid = Client(demo_server[0], verbose=False).predict(
        "<no-truth>", 1, "", "none", "object", "", 4, 0, pictures, api_name="/evaluate_concept")
    assert "ground truth of the training pictures" in about and len(grid) == 18
    reconstruction = table["data"][0]
    assert reconstruction[0] == "reconstruction" and 0.0 <= float(reconstruction[1].split(" ± ")[0]) <= 1.0
    assert "(shape star, color purple, pattern solid)" in reconstruction[4]


def test_cancel_stops_a_running_evaluation_within_a_step(demo_server):
    url, manager = demo_server
    client = Client(url, verbose=False)
    with UNetCalls(manager.current.pipe) as unet:
        job = client.submit("<purple-star>", 8, "", "purple-star", "object", "", 50, 0, [],
                            api_name="/evaluate_concept")
        wait_until_running(job)
        client.predict(api_name="/cancel_evaluation")  # the flag is set when this returns
        steps_at_cancel = unet.count
        with pytest.raises(Exception) as stopped:
            job.result(timeout=30)
        assert re.search(r"Cancelled: cancelled at step \d+ of 50", str(stopped.value)), stopped.value
        assert unet.count - steps_at_cancel <= 1  # at most the step that was running

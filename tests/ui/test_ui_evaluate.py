"""Evaluate tab through a real server on the built-in demo model: a bundled concept set's concept is scored by the
judge (each as `mean ± half-width (n=pictures)` in [0, 1], beside the plain-words baseline and their margin) with the
pictures they came from; a concept with nothing to
score it against says what to configure instead of failing with a traceback."""

import re

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from studio.demo.concept_sets import load_concept_set
from studio.engine.learned.registry import save_concept
from studio.engine.models import ModelManager
from studio.evaluation.config import EvalConfig
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
    with pytest.raises(Exception, match="'no/such-clip' is not a CLIP model this studio offers"):
        evaluate(client, "<no-truth>", clip="no/such-clip")  # the operator's to name (test_operator_roles)
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


@pytest.fixture()
def comparing(demo_model_dir, tmp_path):
    """(studio, on_device) for the compare handler on the demo model: `methods_compared` bound to a fresh studio
    and world, called in this process (as `gpu_task` calls it off ZeroGPU)."""
    from studio.demo.evaluate import DemoWorld
    from studio.ui.state import Studio
    from studio.ui.tabs.evaluate import methods_compared

    manager = ModelManager()
    manager.load(None)
    studio = Studio(manager, ConceptLibrary(tmp_path / "lib"), work_dir=tmp_path / "work")
    demo = DemoWorld()

    def on_device(session, methods, sets, cfg, progress):
        return methods_compared(studio, demo, session, methods, sets, cfg, progress)

    return studio, on_device


def test_comparing_methods_shows_one_row_per_method_with_intervals_size_and_time(comparing, tiny_model_dirs):
    """The "Compare training methods" handler, called as a plain function on the demo model: the methods asked for
    (in the studio's order) trained on the set and scored, each row `mean ± half-width (n=...)`, TI's row without a
    margin over itself, and a model that has no judge refused with what to do."""
    from studio.demo.evaluate import DemoWorld
    from studio.evaluation.report import METHOD_HEADERS
    from studio.ui.tabs.evaluate import compare, methods_compared

    studio, on_device = comparing
    fields = dict(train_steps=3, images=1, steps=2, seed=0)
    about, rows, _chart = compare(studio, on_device, "s1", ["lora", "ti"], ["purple-star"], fields)
    assert [row[0] for row in rows] == ["ti", "lora"] and all(len(row) == len(METHOD_HEADERS) for row in rows)
    for row in rows:
        for cell in row[1:4]:  # identity, prompt fidelity, reconstruction
            assert re.fullmatch(r"-?\d\.\d\d ± \d\.\d\d \(n=\d+\)", cell), row
        assert re.fullmatch(r"\d+\.\d (KB|MB)", row[6]) and re.fullmatch(r"\d+(\.\d+)? s, [1-3] steps", row[7])
    assert rows[0][4] == "-" and re.fullmatch(r"[+-]\d\.\d\d ± \d\.\d\d \(n=\d+\).*", rows[1][4])
    assert "ti, lora trained 3 steps on purple-star" in about
    with pytest.raises(Exception, match="Pick at least one method"):
        compare(studio, on_device, "s1", [], ["purple-star"], fields)
    studio.manager.load(str(tiny_model_dirs["sd1"]))
    with pytest.raises(ValueError, match="needs the demo model's judge.*Model tab"):
        methods_compared(studio, DemoWorld(), "s1", ["ti"], ["purple-star"], EvalConfig(train_steps=1), None)


def test_comparing_the_papers_variants_draws_their_chart_beside_the_table(comparing):
    """The compare handler with a variant: its row follows the methods', and the chart of the rows is a PNG in the
    session's folder with one coloured point per row (identity against prompt fidelity); a style set, which the
    scores do not pool, gives no chart and says which set would."""
    from studio.evaluation.chart import PALETTE, SIZE
    from studio.ui.tabs.evaluate import PAPER_VARIANTS, compare

    studio, on_device = comparing

    assert "progressive" in PAPER_VARIANTS and "ti" not in PAPER_VARIANTS  # a method's name is in Methods
    fields = dict(train_steps=3, images=1, steps=2, seed=0)
    about, rows, chart = compare(studio, on_device, "s1", ["ti"], ["purple-star"], fields, variants=["progressive"])
    assert [row[0] for row in rows] == ["ti", "progressive"] and "ti, progressive trained 3 steps" in about
    assert chart.startswith(str(studio.sessions.get("s1").folder)) and chart.endswith(".png")
    picture = Image.open(chart).convert("RGB")
    colours = {colour for _, colour in picture.getcolors(SIZE[0] * SIZE[1])}
    drawn = [c for c in PALETTE[:3] if tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) in colours]
    assert picture.size == SIZE and PALETTE[1] in drawn and PALETTE[2] not in drawn  # two rows' points, no third
    about, _, chart = compare(studio, on_device, "s1", [], ["zigzag-soft"], fields, variants=["multi3"])
    assert chart is None and "no chart: no object set was scored" in about and "such as dotted-cyan-heart" in about
    with pytest.raises(Exception, match="Pick at least one method or variant"):
        compare(studio, on_device, "s1", [], ["purple-star"], fields, variants=[])

"""A session's training job (studio.jobs.training, over a studio.jobs.training_run.TrainingRun): snapshots as plain
data, the concept kept in the session, and the loss table the live plot draws. No UI."""

from __future__ import annotations

import pickle
import threading

from studio.engine.models import ModelManager
from studio.jobs.session import RunEnd, Sessions
from studio.jobs.training import follow_to_end, keep_concept, training_snapshots
from studio.jobs.training_run import LOSS_SERIES, MEAN_SERIES, SCORE_SERIES, SMOOTHING, TrainingRun, loss_table
from studio.library import ConceptLibrary
from studio.training import TrainConfig, TrainEvent, Trainer


def test_loss_table_draws_the_raw_loss_and_its_running_mean():
    table = loss_table([(k, float(k)) for k in range(1, SMOOTHING + 3)])
    means = [v for v, s in zip(table["loss"], table["series"]) if s == MEAN_SERIES]
    assert means[0] == 1.0 and means[-1] == sum(range(3, SMOOTHING + 3)) / SMOOTHING
    assert SCORE_SERIES not in table["series"]  # no scores given: no such series


def test_loss_table_draws_the_held_back_scores_as_a_series_of_their_own():
    """The scores are not mixed into the running mean of the step losses."""
    table = loss_table([(1, 4.0), (2, 2.0)], [(0, 9.0), (2, 1.0)])
    rows = list(zip(table["step"], table["loss"], table["series"]))
    assert [(s, v) for s, v, name in rows if name == SCORE_SERIES] == [(0, 9.0), (2, 1.0)]
    assert [(s, v) for s, v, name in rows if name == MEAN_SERIES] == [(1, 4.0), (2, 3.0)]
    assert [(s, v) for s, v, name in rows if name == LOSS_SERIES] == [(1, 4.0), (2, 2.0)]


def test_snapshots_carry_the_held_back_scores_and_the_status_keeps_the_step_line(tiny_model_dirs, pictures,
                                                                                 tmp_path):
    """A run scored every 2 steps has its scores in the snapshots; a score event, which comes between two steps,
    still shows where the loop is and the latest step's loss (the progress bar reads it)."""
    model = ModelManager().load(tiny_model_dirs["sd1"])
    session = Sessions(tmp_path / "work").get("s1")
    cfg = TrainConfig("<scored>", init_text="toy", steps=4, batch_size=1, stop_every=2, stop_window=5)
    snapshots = list(training_snapshots(model, session, sorted(pictures.iterdir()), cfg))
    assert [step for step, _ in snapshots[-1].scores] == [0, 2, 4]

    run = TrainingRun(Trainer(model, cfg, sorted(pictures.iterdir()), tmp_path / "out"), threading.Event())
    for event in (TrainEvent("score", step=0, total=4, loss=0.5), TrainEvent("step", step=1, total=4, loss=0.25,
                                                                             steps_per_s=2.0, eta_s=1.5),
                  TrainEvent("score", step=1, total=4, loss=0.125)):
        run._record(event)
    snapshot = run.snapshot()
    assert snapshot.scores == [(0, 0.5), (1, 0.125)] and snapshot.loss == 0.25
    assert "step 1/4 · loss 0.2500 · held-back score 0.1250 · 2.00 steps/s" in snapshot.status


def test_snapshots_are_plain_data_and_the_last_one_carries_the_concept(tiny_model_dirs, pictures, tmp_path):
    """Guards ZeroGPU: every snapshot crosses a process boundary pickled."""
    model = ModelManager().load(tiny_model_dirs["sd1"])
    library = ConceptLibrary(tmp_path / "library")
    session = Sessions(tmp_path / "work").get("s1")
    cfg = TrainConfig("<run-test>", init_text="toy", steps=2, batch_size=1, preview_every=1)
    snapshots = [pickle.loads(pickle.dumps(s)) for s in training_snapshots(model, session, sorted(pictures.iterdir()),
                                                                           cfg)]
    last = snapshots[-1]
    assert last.concept is not None and last.concept.token == "<run-test>" and last.path
    assert all(s.concept is None for s in snapshots[:-1])
    status = keep_concept(library, session, last)
    assert "<run-test> is ready" in status and session.thumbnails["<run-test>"].is_file()
    assert library.get("<run-test>", "s1").token == "<run-test>"


def test_a_run_nobody_watches_is_read_to_its_end_and_kept(tiny_model_dirs, pictures, tmp_path):
    """Guards the browser's Cancel closing /train: what the run learned still reaches the session."""
    model = ModelManager().load(tiny_model_dirs["sd1"])
    library = ConceptLibrary(tmp_path / "library")
    session = Sessions(tmp_path / "work").get("s1")
    cfg = TrainConfig("<unwatched>", init_text="toy", steps=2, batch_size=1, preview_every=0)
    end = RunEnd()
    follow_to_end(library, session, training_snapshots(model, session, sorted(pictures.iterdir()), cfg), end)
    assert end.done.is_set() and "<unwatched> is ready" in end.status and end.path
    assert session.training is not None and session.training.concept.token == "<unwatched>"

"""A session's training job (studio.training.run): snapshots as plain data, the concept kept in the session, and the
loss table the live plot draws. No UI."""

from __future__ import annotations

import pickle

from studio.engine.models import ModelManager
from studio.engine.session import RunEnd, Sessions
from studio.library import ConceptLibrary
from studio.training import TrainConfig
from studio.training.run import SMOOTHING, follow_to_end, keep_concept, loss_table, training_snapshots


def test_loss_table_draws_the_raw_loss_and_its_running_mean():
    table = loss_table([(k, float(k)) for k in range(1, SMOOTHING + 3)])
    means = [v for v, s in zip(table["loss"], table["series"]) if s != "loss"]
    assert means[0] == 1.0 and means[-1] == sum(range(3, SMOOTHING + 3)) / SMOOTHING


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

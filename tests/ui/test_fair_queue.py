"""The device's line through a real server and gradio_client (issue 23, item 7): a client that sends 20 jobs gets its
share (one running, two waiting) and a one-line refusal for the rest; the next user waits behind one of them, not
all; each waiting job shows its honest place; Cancel takes a waiting job out of line; a run over the step limit is
refused before it waits."""

from __future__ import annotations

import time

import pytest
from gradio_client import Client, handle_file

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import build_app
from ui_server import UNetCalls, launch

LONG = 100  # denoising steps of a job that holds the device for a while (the Steps slider's most)
REFUSAL = "You already have a job waiting (2 of at most 2 per user): wait for it or cancel it."
LIMIT_S = 180.0  # each wait below is for an event of a loaded 2-core machine; a hang fails instead of blocking CI


@pytest.fixture(scope="module")
def fair_server(tiny_model_dirs, tmp_path_factory):
    """`(url, manager)` of a studio with the default limits: one job running and two waiting per user."""
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    app = build_app(manager, ConceptLibrary(tmp_path_factory.mktemp("lib")), work_dir=tmp_path_factory.mktemp("work"))
    yield launch(app), manager
    app.close()


def generate(client: Client, steps: int, seed: int = 1):
    """One 32x32 picture of `steps` steps, submitted."""
    return client.submit("a red circle", "", seed, steps, 7.5, "euler_a", 32, 32, 1, api_name="/generate")


def place(job) -> str:
    """Where a job is: "waiting: N jobs ahead", "running" (it reports steps or has sent pictures), "done", or "" (no
    word yet). A waiting job says so on its progress bar, and /train in its status line too (gradio_client's status
    of a job that has sent an output may not carry the bar)."""
    if job.done():
        return "done"
    outputs = job.outputs()
    status = outputs[-1][0] if outputs and isinstance(outputs[-1], (list, tuple)) else None
    if isinstance(status, str) and status.startswith("waiting"):
        return status
    progress = job.status().progress_data
    if progress and (progress[0].desc or "").startswith("waiting"):
        return progress[0].desc
    return "running" if progress or outputs else ""


def wait_for(condition, what: str) -> None:
    """Wait until `condition()` holds (the server's next message), failing after LIMIT_S."""
    deadline = time.monotonic() + LIMIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {LIMIT_S:.0f} s"
        time.sleep(0.05)


def error(job) -> str:
    """The one-line message a job ended with (gradio_client's AppError carries the server's)."""
    exc = job.exception(timeout=LIMIT_S)
    assert exc is not None, "the job ended without an error"
    return str(exc)


def test_a_client_with_twenty_jobs_gets_its_share_and_the_next_user_waits_behind_one_of_them(fair_server):
    """Guards issue 23: one scripted client queued 20 jobs and the next user waited behind all of them."""
    url, _ = fair_server
    flood, late = Client(url, verbose=False), Client(url, verbose=False)
    jobs = [generate(flood, LONG, seed=k) for k in range(20)]
    try:
        wait_for(lambda: sum(j.done() for j in jobs) >= 17, "17 refusals")
        refused = [j for j in jobs if j.done()]
        assert [error(j) for j in refused] == [REFUSAL] * 17
        mine = [j for j in jobs if not j.done()]
        wait_for(lambda: sorted(map(place, mine)) == ["running", "waiting: 1 job ahead", "waiting: 2 jobs ahead"],
                 "one flood job running and two waiting")
        theirs = generate(late, 2)
        # Behind the job that runs, not behind the flood's waiting ones, which now wait behind it.
        wait_for(lambda: place(theirs) == "waiting: 1 job ahead", "the late user's place")
        assert sorted(map(place, mine)) == ["running", "waiting: 2 jobs ahead", "waiting: 3 jobs ahead"]
        assert len(theirs.result(timeout=LIMIT_S)) == 1
        assert sum(j.done() for j in mine) == 1  # only the job that ran when it came: the others came after it
    finally:
        flood.predict(api_name="/cancel")  # its running job stops, its waiting ones leave the line
        wait_for(lambda: all(j.done() for j in jobs), "the flood's jobs to end")


def test_cancel_takes_a_waiting_job_out_of_line_and_the_jobs_behind_move_up(fair_server, concept_pictures):
    url, _ = fair_server
    holder, b, c, d, e = (Client(url, verbose=False) for _ in range(5))
    held = generate(holder, LONG)
    wait_for(lambda: place(held) == "running", "the holder's job to start")
    b_job = generate(b, 2)
    wait_for(lambda: place(b_job) == "waiting: 1 job ahead", "b's place")
    c_job = c.submit([handle_file(p) for p in concept_pictures], "<fair-c>", "toy", "object", 1, 3, 0.005, 2, 0,
                     api_name="/train")
    wait_for(lambda: place(c_job) == "waiting: 2 jobs ahead", "c's place")
    d_job = generate(d, 2)
    wait_for(lambda: place(d_job) == "waiting: 3 jobs ahead", "d's place")
    try:
        assert ("waiting: 2 jobs ahead", None) in [tuple(out) for out in c_job.outputs()]  # /train's status line

        b.predict(api_name="/cancel")  # the studio's Cancel
        assert error(b_job) == "Cancelled: before it started"
        wait_for(lambda: (place(c_job), place(d_job)) == ("waiting: 1 job ahead", "waiting: 2 jobs ahead"),
                 "c and d to move up")

        c.predict(api_name="/cancel_training")
        assert error(c_job) == "Cancelled: before it started"
        wait_for(lambda: place(d_job) == "waiting: 1 job ahead", "d to move up")

        d_job.cancel()  # gradio_client's own cancel: the event ends, and its place goes with it
        e_job = generate(e, 2)
        wait_for(lambda: place(e_job) == "waiting: 1 job ahead", "e's place, where d's was freed")
    finally:
        holder.predict(api_name="/cancel")
    assert len(e_job.result(timeout=LIMIT_S)) == 1


def test_a_run_over_the_step_limit_is_refused_in_one_line_before_it_trains(fair_server, concept_pictures):
    """Guards issue 23: a 3,000-step /train held everyone else until cancelled."""
    url, manager = fair_server
    client = Client(url, verbose=False)
    with UNetCalls(manager.current.pipe, training_only=True) as unet:
        job = client.submit([handle_file(p) for p in concept_pictures], "<too-long>", "toy", "object", 1, 3000,
                            0.005, 2, 0, api_name="/train")
        try:
            assert error(job) == ("Steps 3000 is over this studio's limit of 2000 steps a run: train at most 2000 "
                                  "(its operator sets the limit with launch.py --max-train-steps)")
        finally:
            client.predict(api_name="/cancel_training")
        assert unet.count == 0

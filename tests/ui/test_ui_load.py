"""A bounded load test: 8 gradio_client users at once on one studio, mixing train, generate, import and an oversized
job. Every job finishes (or is refused with its reason), no user sees another's concept, nothing is lost."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from gradio_client import Client, handle_file
from PIL import Image

from studio.engine.learned.registry import save_concept
from studio.engine.learned.word import Concept

JOB_LIMIT_S = 240  # the whole mix on the tiny model takes ~20 s on 2 cores; a hang fails instead of blocking CI


def parameters(gallery) -> str:
    return Image.open(gallery[0]["image"]).info.get("parameters", "")


def generate(client: Client, prompt: str):
    return client.predict(prompt, "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")


def test_eight_users_at_once_get_their_own_results_and_an_oversized_job_is_refused(studio_server, concept_pictures,
                                                                                    tmp_path):
    url, _, root = studio_server
    clients = [Client(url, verbose=False) for _ in range(8)]

    def trainer(k: int) -> str:
        status, path = clients[k].predict([handle_file(p) for p in concept_pictures], f"<load-train-{k}>", "toy",
                                          "object", 1, 3, 0.005, 2, 0, api_name="/train")
        assert f"<load-train-{k}> is ready" in status, status
        return parameters(generate(clients[k], f"a photo of <load-train-{k}>"))

    def importer(k: int) -> str:
        file = save_concept(Concept(f"<load-import-{k}>", {"text_encoder": torch.randn(1, 768)}, {}),
                            tmp_path / f"import-{k}")
        report, _ = clients[k].predict([handle_file(str(file))], api_name="/import_concepts")
        assert f"added <load-import-{k}>" in report, report
        return parameters(generate(clients[k], f"a photo of <load-import-{k}>"))

    def generator(k: int) -> str:  # names the others' words: they are plain text to this user
        return parameters(generate(clients[k], "a photo of <load-train-0> and <load-import-2>"))

    def oversized(k: int) -> str:
        try:
            clients[k].predict("a red circle", "", 1, 2, 7.5, "euler_a", 100000, 100000, 1, api_name="/generate")
        except Exception as exc:  # noqa: BLE001 - gradio_client's AppError carries the server's message
            return str(exc)
        raise AssertionError("a 100000x100000 picture was not refused")

    work = [trainer, trainer, importer, importer, generator, generator, generator, oversized]
    with ThreadPoolExecutor(len(work)) as pool:
        futures = [pool.submit(job, k) for k, job in enumerate(work)]
        results = [f.result(timeout=JOB_LIMIT_S) for f in futures]

    for k in (0, 1):
        assert f"Concepts: <load-train-{k}>" in results[k]
    for k in (2, 3):
        assert f"Concepts: <load-import-{k}>" in results[k]
    for k in (4, 5, 6):
        assert "Concepts:" not in results[k]  # nobody else's concept leaked into these prompts
    assert "100000" in results[7] and "width" in results[7]
    for k, client in enumerate(clients):  # each session lists exactly its own concepts; nothing reached the library
        tokens = {row[0] for row in client.predict(api_name="/library")["data"]}
        own = {0: "<load-train-0>", 1: "<load-train-1>", 2: "<load-import-2>", 3: "<load-import-3>"}.get(k)
        assert {t for t in tokens if t.startswith("<load-")} == ({own} if own else set()), (k, tokens)
    assert [p for p in root.iterdir() if p.name.startswith("load")] == []


def test_a_client_with_twenty_queued_jobs_holds_up_nobody_while_six_others_work(studio_server, concept_pictures):
    """Guards issue 23: one scripted client queued 20 jobs and the next user waited behind all of them (rank 18 of
    19). Now it gets its share (one running, two waiting; the rest refused in one line), and each other user waits
    behind at most the flood's job that ran when theirs came and one more per round of the line."""
    import threading
    import time

    url, _, _ = studio_server
    flood, others = Client(url, verbose=False), [Client(url, verbose=False) for _ in range(6)]
    ended: dict[str, float] = {}  # job -> when it ended (time.monotonic(); one clock: the server runs in this process)
    lock = threading.Lock()

    def timed(name: str, work):
        def run():
            started = time.monotonic()
            try:
                return started, work()
            finally:
                with lock:
                    ended[name] = time.monotonic()
        return run

    def flood_job(k: int):
        return flood.predict("a red circle", "", k, 20, 7.5, "euler_a", 32, 32, 1, api_name="/generate")

    def other_job(k: int):
        if k < 2:  # two train, four generate
            return others[k].predict([handle_file(p) for p in concept_pictures], f"<flooded-{k}>", "toy", "object", 1,
                                     3, 0.005, 2, 0, api_name="/train")
        return generate(others[k], f"a photo of a blue square {k}")

    with ThreadPoolExecutor(26) as pool:
        floods = [pool.submit(timed(f"flood-{k}", lambda k=k: flood_job(k))) for k in range(20)]
        theirs = [pool.submit(timed(f"other-{k}", lambda k=k: other_job(k))) for k in range(6)]
        refusals = [f.exception(timeout=JOB_LIMIT_S) for f in floods]
        works = [f.result(timeout=JOB_LIMIT_S) for f in theirs]

    assert sum("You already have a job waiting" in str(exc) for exc in refusals if exc is not None) == 17
    flood_ends = [ended[f"flood-{k}"] for k, exc in enumerate(refusals) if exc is None]
    assert len(flood_ends) == 3
    for k, (started, _) in enumerate(works):
        behind = sum(started < end < ended[f"other-{k}"] for end in flood_ends)
        # At most the flood's job that ran when this one came (or ended while it was on its way to the server) and
        # the one of the round of the line this one is in; first come, first served put it behind all three.
        assert behind <= 2, f"user {k} waited behind {behind} of the flood's jobs"
    assert all("is ready" in works[k][1][0] for k in (0, 1))

"""One generation of a session: a form's fields to an engine request, and the request run as a `Job`. No Gradio.

`request_for` turns a form's fields into a `GenerateRequest` with the concepts and LoRAs its prompt names (asked of
the `ConceptLibrary`), and says which words look like concepts but name none.

`generation_updates` is one generation, streamed: the engine runs in the job's thread and each denoising step (with a
preview picture every `GenerateRequest.preview_every` steps) is handed on as it happens, then the saved pictures.
Plain data in and out, so that on ZeroGPU it can run in the GPU worker process.
"""

from __future__ import annotations

import re
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

from PIL import Image

from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.perfusion import with_gate
from studio.engine.learned.word import Concept
from studio.engine.prompts import split_lora_tags
from studio.errors import LoraError
from studio.jobs.job import Job
from studio.jobs.session import Session
from studio.library import ConceptLibrary

# A word written the way concept words are (<my-cat>): one that is no concept gets a warning, not silence.
CONCEPT_LIKE = re.compile(r"<[^<>\s,()\[\]{}:|]+>")


def request_for(fields: dict, library: ConceptLibrary, session_id: str) -> tuple[GenerateRequest, list[str]]:
    """The engine request for a form's fields, with the concepts its prompt and negative prompt name and the LoRAs
    its prompt names (`ConceptLibrary.resolve`: its `<lora:name:w>` tags, and the LoRA that comes with a pivotal
    word), and the words written like concepts (`<...>`) that name none: the model reads those as plain text, which
    the user should hear.

    A tag naming no LoRA raises LoraError; so does one in the negative prompt, where `generate` reads no tags (a
    LoRA changes the model for the whole picture, not one prompt), rather than leaving it there as plain text. For
    the same reason a pivotal word in the negative prompt gives its vectors there, and its LoRA only when the prompt
    names it too. `fields["perfusion_gate"]` (beta, tau), when given, is the gate of every Perfusion concept the
    request uses (`PerfusionConcept.with_gate`)."""
    fields = dict(fields)
    gate = fields.pop("perfusion_gate", None)  # (beta, tau) for the request's Perfusion concepts, or None: theirs
    prompt, negative = fields["prompt"], fields.get("negative_prompt", "")
    negative_tags = split_lora_tags(negative)[1]
    if negative_tags:
        name = negative_tags[0][0]
        raise LoraError(f"<lora:{name}> is in the negative prompt: a LoRA changes the whole picture, so write its "
                        f"tag in the prompt (<lora:{name}:-0.5> to push away from it)")
    learned = library.resolve(prompt, session_id)
    learned += [c for c in library.resolve(negative, session_id) if isinstance(c, Concept)]  # words only: no LoRA
    if gate is not None:
        learned = with_gate(learned, *gate)
    req = GenerateRequest(concepts=learned, **fields)  # the same word twice is used once
    known = {word.token for word in req.words}  # the words it names and those its LoRA files carry
    known |= {w for lora, _ in req.loras for w in CONCEPT_LIKE.findall(lora.phrase)}
    text = split_lora_tags(prompt)[0] + " " + negative
    unknown = sorted({word for word in CONCEPT_LIKE.findall(text) if word not in known})
    return req, unknown


@dataclass
class GenerationUpdate:
    """A step of a running generation (`preview` set every few steps) or, last, the saved pictures (`paths`)."""

    step: int
    total: int
    preview: Image.Image | None = None
    paths: list[str] | None = None


def generation_updates(model, req: GenerateRequest, session: Session) -> Iterator[GenerationUpdate]:
    """Generate `req` on `model` for `session`; yield every step as it happens, then the saved PNGs' paths.

    Engine errors (Cancelled, a bad request) are raised from this iterator after the steps that ran. Closing the
    iterator early (the browser's Cancel closes a running event) stops the generation within one step, as does
    `session.cancel()`.
    """
    def work(emit, cancel) -> list[str]:
        def on_step(step: int, total: int, preview: Image.Image | None) -> None:
            emit(GenerationUpdate(step, total, preview))

        return session.save_pictures(generate(model, req, on_step=on_step, cancel=cancel))

    job = Job(f"generate {session.id}", work, session.fresh_cancel_flag("generate")).start()
    step = total = 0
    with closing(job.events()) as updates:  # closed early: the job's flag is set (`Job.events`)
        for update in updates:
            step, total = update.step, update.total
            yield update
    yield GenerationUpdate(step, total, paths=job.result())

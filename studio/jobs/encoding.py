"""A session's encoding job: pictures -> an image concept in one pass of the IP-Adapter's image encoder (no
training), kept as the session's own concept. No Gradio.

The Train tab's "Encode (1 s)" button calls `encode_for_session`; the concept is then written in prompts like a word
the session trained (`ConceptLibrary.add_session_concept`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from studio.engine.learned.image_encoding import encode_pictures
from studio.engine.learned.image_prompt import ImageConcept
from studio.engine.learned.ip_adapter import DEMO_ADAPTER
from studio.engine.names import WordError, check_word
from studio.engine.pictures import open_picture
from studio.errors import UserError
from studio.jobs.session import Session
from studio.library import ConceptLibrary


@dataclass
class Encoded:
    """What an encoding job made: the concept kept in the session, its time and the status line to show."""

    concept: ImageConcept
    seconds: float
    status: str


def encode_for_session(model, library: ConceptLibrary, session: Session, files: list[str], token: str,
                       class_word: str = "", adapter: str = DEMO_ADAPTER) -> Encoded:
    """Encode the pictures `files` as image concept `token` (its `class_word` standing where the token is written)
    with `adapter` (`studio encode --adapter`) and keep it as `session`'s own concept (a concept of that word in the
    session is replaced, as training the word again replaces it)."""
    # 1. Check inputs: the word and the pictures (size-checked before decoding).
    try:
        check_word(token, "new word")
    except WordError as exc:
        raise UserError(str(exc)) from None
    if not files:
        raise UserError("Upload at least one picture of your concept.")
    pictures = [open_picture(Path(f)) for f in files]
    # 2. One pass of the image encoder.
    started = time.perf_counter()
    concept = encode_pictures(model, pictures, token, adapter, prompt_text=class_word.strip())
    seconds = time.perf_counter() - started
    # 3. The session's own concept.
    kept = library.add_session_concept(session.id, concept)
    status = (f"{kept.token} encoded from {len(pictures)} picture(s) in {seconds:.2f} s: write it in any prompt in "
              f"this session, e.g. “a photo of {kept.token}”.")
    return Encoded(kept, seconds, status)

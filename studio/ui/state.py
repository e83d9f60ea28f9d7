"""What every tab shares: the model manager, the concept library, and per-session scratch space.

Per-user state: each session has its own cancel flags, output folder, training run, thumbnails and session concepts;
the shared library folder is visible to all. A browser's session is a random id kept in its localStorage
(`gr.BrowserState`, see `Studio.attach`), so a page reload finds its concepts again; a gradio_client `Client` is
its own session (Gradio's session hash). Session concepts are also kept on disk (`ConceptLibrary.sessions_dir`)
until they have not been used for SESSION_DAYS.
"""

from __future__ import annotations

import html
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from studio.engine.generate import RANDOM_SEED, Cancelled, GenerateRequest, GenerateResult, generate, save_png
from studio.engine.memory import preset
from studio.engine.models import LoadedModel, ModelManager
from studio.engine.names import file_stem, inside, session_key
from studio.errors import UserError
from studio.library import ConceptLibrary, LibraryEntry
from studio.ui.gpu import gpu_task

# Errors that are the user's to fix: shown as a message in the UI (gr.Error), never as a traceback. UserError is every
# engine error with advice (concept, model, training, picture, word); plain ValueError the request dataclasses' checks.
USER_ERRORS = (UserError, ValueError, FileNotFoundError)


# A word written the way concept words are (<my-cat>): one that is no concept gets a warning, not silence.
CONCEPT_LIKE = re.compile(r"<[^<>\s,()\[\]{}:|]+>")
# A browser's session concepts are kept this long after its last visit.
SESSION_DAYS = 7


def user_error(message: object, request: gr.Request | None = None) -> gr.Error:
    """The gr.Error for a message, so that it reads as written everywhere: the browser shows error messages as HTML,
    where a concept word like <my-cat> is an unknown tag that hides itself and the rest of the message (seen in
    chromium), so it gets the text escaped; a gradio_client (which says so in its `x-gradio-user: api` header) gets
    the text itself."""
    text = str(message)
    return gr.Error(text if is_api_client(request) else html.escape(text, quote=False))


def for_client(error: gr.Error, request: gr.Request | None) -> gr.Error:
    """`error` (made with `user_error` where the request was not at hand) as `request`'s client should read it."""
    return gr.Error(html.unescape(str(error.message))) if is_api_client(request) else error


def is_api_client(request: gr.Request | None) -> bool:
    """Whether `request` comes from gradio_client rather than a browser."""
    headers = getattr(request, "headers", None) or {}
    return headers.get("x-gradio-user") == "api"


@dataclass
class Studio:
    """The state the handlers share. `memory_mode` is the mode the current model was loaded in."""

    manager: ModelManager
    library: ConceptLibrary
    memory_mode: str = "auto"
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="concept-studio-")))
    runs: dict = field(default_factory=dict)  # session -> latest studio.ui.training_run.TrainingSnapshot
    thumbnails: dict[tuple[str, str], Path] = field(default_factory=dict)  # (session, token) -> picture
    _cancel: dict[tuple[str, str], threading.Event] = field(default_factory=dict)
    _browsers: dict[str, str] = field(default_factory=dict)  # Gradio session hash -> the browser's session id
    training_ends: dict = field(default_factory=dict)  # session -> studio.ui.tabs.train.RunEnd of its latest run

    @property
    def model(self) -> LoadedModel:
        return self.manager.current or self.manager.load(None)

    def session_of(self, request: gr.Request | None) -> str:
        """The session a request belongs to: its browser's (after `attach`), else Gradio's session hash."""
        hash_ = getattr(request, "session_hash", None) or "anonymous"
        return self._browsers.get(hash_, hash_)

    def attach(self, request: gr.Request | None, browser_id: object) -> str:
        """Tie a page (its session hash) to the session id its browser keeps; a new id when it has none (or one that
        this studio could not have made). Returns the id for the browser to keep."""
        session = session_key(browser_id) or secrets.token_urlsafe(24)
        hash_ = getattr(request, "session_hash", None)
        if hash_:
            self._browsers[hash_] = session
        self.library.expire_sessions(SESSION_DAYS * 86400)
        return session

    def detach(self, request: gr.Request | None) -> None:
        """A page closed (or reloaded): free what its session holds in memory once no other page uses it. Its
        concepts stay on disk, so the next page of the same browser finds them."""
        hash_ = getattr(request, "session_hash", None) or "anonymous"
        session = self._browsers.pop(hash_, hash_)
        if session not in self._browsers.values():
            self.forget_session(session)

    def session_dir(self, session: str) -> Path:
        """The session's own folder for pictures and training files (its name made safe: ids come from clients)."""
        path = inside(self.work_dir, file_stem(session or "anonymous", fallback="anonymous"))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cancel_flag(self, session: str, job: str = "generate") -> threading.Event:
        """The flag that stops this session's `job` ("generate" or "train") within one step."""
        return self._cancel.setdefault((session or "anonymous", job), threading.Event())

    def entries(self, session: str) -> list[LibraryEntry]:
        """Library files and this session's concepts, each with whether it fits the loaded model and why not."""
        return self.library.entries(self.model.encoder_dims, session)

    def concept_tokens(self, session: str) -> list[str]:
        """The words a concept picker offers: every concept this session can use with the loaded model."""
        return [entry.token for entry in self.entries(session) if entry.fits]

    def forget_session(self, session: str) -> None:
        """Drop what a session keeps in memory: its concepts (their files stay), training run, thumbnails and flags."""
        self.library.drop_session(session)
        self.runs.pop(session, None)
        self.training_ends.pop(session, None)
        for key in [k for k in self.thumbnails if k[0] == session]:
            del self.thumbnails[key]
        for key in [k for k in self._cancel if k[0] == session]:
            del self._cancel[key]

    def describe_memory(self) -> str:
        chosen = preset(self.memory_mode)
        auto = f"auto → {chosen.name}" if self.memory_mode == "auto" else chosen.name
        return f"{auto}: {chosen.explanation}"

    def __post_init__(self) -> None:
        if self.library.sessions_dir is None:  # a library made without one keeps session concepts beside our work
            self.library.sessions_dir = self.work_dir / ".sessions"  # no session_dir is hidden
        # The one step that needs the GPU, decorated for ZeroGPU (studio.ui.gpu). There it runs in a forked worker:
        # it takes plain values and returns file paths, and every change to shared state stays out here.
        self.render = gpu_task(self._render)

    def run_generate(self, req_fields: dict, session: str, progress: gr.Progress | None = None,
                     request: gr.Request | None = None) -> list[str]:
        """Resolve the concepts named in the prompts, generate, save PNGs with parameters; return their paths.
        Engine errors become one gr.Error line (`request`: who asked, which decides how it is written)."""
        self.fresh_cancel_flag(session)  # what `render` passes to the engine and Cancel sets
        try:
            return self.render(self.request_for(req_fields, session), session, progress)
        except Cancelled as exc:
            raise user_error(f"Cancelled: {exc}", request) from exc
        except USER_ERRORS as exc:
            raise user_error(exc, request) from exc

    def _render(self, req: GenerateRequest, session: str, progress: gr.Progress | None) -> list[str]:
        """Generate `req` on the current model and save the pictures (PNG with parameters) in the session folder."""
        on_step = None if progress is None else (lambda step, total, _preview: progress((step, total), unit="steps"))
        result = generate(self.model, req, on_step=on_step, cancel=self.cancel_flag(session))
        return self.save_pictures(result, session)

    def request_for(self, req_fields: dict, session: str) -> GenerateRequest:
        """The engine request for a form's fields, with the concepts its prompt and negative prompt name."""
        text = req_fields["prompt"] + " " + req_fields.get("negative_prompt", "")
        concepts = self.library.resolve(text, self.model.encoder_dims, session)
        known = {concept.token for concept in concepts}
        unknown = sorted({word for word in CONCEPT_LIKE.findall(text) if word not in known})
        if unknown:  # written like a concept but none of this name: the model reads it as plain text
            gr.Warning(html.escape(f"No concept called {', '.join(unknown)} in the library or this session: "
                                   "it is read as plain words. Check the spelling or train/import it first."))
        return GenerateRequest(concepts=concepts, **req_fields)

    def fresh_cancel_flag(self, session: str, job: str = "generate") -> threading.Event:
        """A new, unset flag for a `job` that starts now (what Cancel sets from here on). A run that was closed
        early keeps its own, set, flag: clearing a shared one could let it run on after its cancel."""
        flag = self._cancel[(session or "anonymous", job)] = threading.Event()
        return flag

    def save_pictures(self, result: GenerateResult, session: str) -> list[str]:
        """Save each picture of `result` (PNG with its parameters) in the session folder; return their paths."""
        out = self.session_dir(session)
        paths = []
        for image, seed in zip(result.images, result.seeds):
            path = out / f"{len(list(out.glob('*.png'))):05d}-{seed}.png"
            save_png(image, path)
            paths.append(str(path))
        return paths


def seed_or_random(value) -> int | None:
    """UI seed field: -1 (RANDOM_SEED, or empty) means a random seed; any other number goes to the engine as it is,
    which says what range a seed must be in (check_seed)."""
    return None if value is None or int(value) == RANDOM_SEED else int(value)


def size_or_native(value) -> int | None:
    """UI size field: 0 (or empty) means the model's native size."""
    return int(value) if value else None

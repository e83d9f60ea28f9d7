"""What every tab shares: the model manager, the concept library, and the way from a request to its session.

Per-user state lives in `studio.jobs.session.Session` (cancel flags, output folder, training run, thumbnails) and the
library's session concepts; the shared library folder is visible to all. Every generation of every tab goes through
`Studio.stream` (the streamed run of `studio.jobs.generation.generation_updates`).

A browser's session is a random id that its localStorage keeps signed (`gr.BrowserState`, see `Studio.attach`), so
a page reload finds its concepts again and nobody else can: a bare or forged id gets a new session. A gradio_client
`Client` is its own session, named by its Gradio session hash in a namespace no browser id is in (`client_session`).
Session concepts are also kept on disk (`ConceptLibrary.sessions_dir`) until they have not been used for SESSION_DAYS.

A shared studio bounds what one user holds (`StudioLimits`, launch.py's options): heavy jobs take turns on the device
from `Studio.scheduler` (round-robin between sessions, a few jobs each: `studio.ui.turns`), a training run's steps are
capped (`Studio.train_step_limit`), and each session's files have a quota and expire with its concepts
(`studio.jobs.session.DiskLimits`).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import os
import secrets
import tempfile
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gradio as gr

from studio.engine.files import remove_temp_leftovers
from studio.engine.generate import RANDOM_SEED, Cancelled, GenerateRequest
from studio.engine.memory import preset
from studio.engine.models import LoadedModel, ModelManager
from studio.engine.names import session_key
from studio.errors import UserError
from studio.jobs.fair import FairScheduler, QueueLimits, check_train_steps, train_step_limit
from studio.jobs.generation import GenerationUpdate, generation_updates, request_for
from studio.jobs.session import ANONYMOUS, DiskLimits, Session, Sessions, SpentFiles
from studio.library import ConceptLibrary, LibraryEntry
from studio.ui.gpu import gpu_task

# Errors that are the user's to fix: shown as a message in the UI (gr.Error), never as a traceback. UserError is every
# engine error with advice (concept, model, training, picture, word); plain ValueError the request dataclasses' checks.
USER_ERRORS = (UserError, ValueError, FileNotFoundError)

# A browser's session concepts are kept this long after its last visit.
SESSION_DAYS = 7
# Gradio session hashes are chosen by clients: their sessions carry this mark, which no browser id (hex) has.
CLIENT_SESSION_PREFIX = "api-"


def client_session(session_hash: str) -> str:
    """The session of a client that holds no browser session (a gradio_client `Client`): its Gradio session hash,
    marked, so that no hash a client picks can name a browser's session."""
    return f"{CLIENT_SESSION_PREFIX}{session_hash}"


def session_signing_key(sessions_dir: Path) -> bytes:
    """The key that signs browsers' session ids, made once and kept (0600) with the sessions, so that a browser's
    signed id stays good across restarts. It never leaves the server, unlike gr.BrowserState's `secret`, which Gradio
    sends to every page (the browser decrypts its localStorage with it)."""
    path = sessions_dir / ".session-key"
    if not path.is_file():
        sessions_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
        os.replace(temporary, path)
    return path.read_bytes().strip()


@contextmanager
def as_user_errors(request: gr.Request | None = None) -> Iterator[None]:
    """The edge between a handler and the engine: a user's mistake (or a cancelled job) raised in the block leaves it
    as one gr.Error line written for `request`'s client (see `user_error`); anything else keeps its traceback."""
    try:
        yield
    except gr.Error:
        raise  # already one line, written for its client (a gr.Error is a ValueError too)
    except Cancelled as exc:
        raise user_error(f"Cancelled: {exc}", request) from exc
    except USER_ERRORS as exc:
        raise user_error(exc, request) from exc


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


# How often a running studio looks for expired sessions (at a job's start): their age is counted in days.
EXPIRE_EVERY_S = 600.0


@dataclass(frozen=True)
class StudioLimits:
    """What one user may hold of a shared studio (launch.py's options): their share of the device's line, a training
    run's steps (None: by the model's size, `studio.jobs.fair.TRAIN_STEP_LIMITS`) and their session's disk quota."""

    queue: QueueLimits = field(default_factory=QueueLimits)
    max_train_steps: int | None = None
    session_quota_bytes: int = DiskLimits.quota_bytes


@dataclass
class Studio:
    """The state the handlers share. `memory_mode` is the mode the current model was loaded in; `sessions` are the
    engine sessions (their folders under `work_dir`); `scheduler` the line for the device their heavy jobs take
    turns in (`studio.ui.turns`)."""

    manager: ModelManager
    library: ConceptLibrary
    memory_mode: str = "auto"
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="concept-studio-")))
    limits: StudioLimits = field(default_factory=StudioLimits)
    sessions: Sessions = field(init=False)
    scheduler: FairScheduler = field(init=False)
    spent_uploads: SpentFiles = field(default_factory=SpentFiles)  # uploads used up, deleted after a grace
    image_adapter: str = "demo"  # the Train tab's Encode button's IP-Adapter (studio encode --adapter's default)
    _expired_at: float | None = field(default=None, repr=False)  # when `expire_sessions` last looked
    _browsers: dict[str, str] = field(default_factory=dict)  # Gradio session hash -> the browser's session id
    _signing_key: bytes = field(default=b"", repr=False)  # signs browsers' session ids (session_signing_key)

    def __post_init__(self) -> None:
        if self.library.sessions_dir is None:  # a library made without one keeps session concepts beside our work
            self.library.sessions_dir = self.work_dir / ".sessions"  # no session folder is hidden
        # Each session's files (its folder here and its concepts in the library) share one quota and expire together.
        self.scheduler = FairScheduler(self.limits.queue)
        disk = DiskLimits(self.limits.session_quota_bytes, SESSION_DAYS * 86400.0)
        self.sessions = Sessions(self.work_dir, disk, self.scheduler, elsewhere=[self.library.sessions_dir])
        remove_temp_leftovers(self.library.sessions_dir)  # what killed writes left; nothing writes there yet
        self.expire_sessions()
        self._signing_key = session_signing_key(self.library.sessions_dir)
        # The one step of a generation that needs the GPU, decorated for ZeroGPU (studio.ui.gpu). There it runs in a
        # forked worker: it takes plain values and yields plain data, and every change to shared state stays out here.
        self.on_device = gpu_task(self.render_streamed)

    @property
    def model(self) -> LoadedModel:
        return self.manager.current or self.manager.load(None)

    def session_of(self, request: gr.Request | None) -> str:
        """The session id a request belongs to: its browser's (after `attach`), else its client's (`client_session`)."""
        hash_ = getattr(request, "session_hash", None)
        if not hash_:
            return ANONYMOUS
        return self._browsers.get(hash_) or client_session(hash_)

    def session(self, request: gr.Request | None) -> Session:
        """The engine session a request belongs to."""
        return self.sessions.get(self.session_of(request))

    def attach(self, request: gr.Request | None, browser_value: object) -> str:
        """Tie a page (its session hash) to the session its browser keeps, as `id.signature`: the signature proves
        that this server gave the id to that browser, so a bare id, or one signed by anyone else, gets a new session
        instead. Returns the signed id for the browser to keep (the page's BrowserState)."""
        session = self.verified_session(browser_value) or secrets.token_hex(16)  # hex: never a client's ("api-")
        hash_ = getattr(request, "session_hash", None)
        if hash_:
            self._browsers[hash_] = session
        self.library.expire_sessions(SESSION_DAYS * 86400)
        return f"{session}.{self._signature(session)}"

    def verified_session(self, browser_value: object) -> str | None:
        """The session id in a browser's `id.signature`, None unless the signature is this server's (checked in
        constant time)."""
        session, _, signature = str(browser_value or "").partition(".")
        if session_key(session) is None or session.startswith(CLIENT_SESSION_PREFIX):
            return None
        expected = self._signature(session).encode("ascii")
        return session if hmac.compare_digest(signature.encode("utf-8", "replace"), expected) else None

    def _signature(self, session: str) -> str:
        return hmac.new(self._signing_key, session.encode("ascii"), hashlib.sha256).hexdigest()

    def browser_storage_secret(self) -> str:
        """gr.BrowserState's `secret`, which Gradio sends to every page: derived one way from the signing key, so it
        tells nothing about that key, and stable, so that a browser reads its id back after a restart."""
        return hmac.new(self._signing_key, b"gr.BrowserState secret", hashlib.sha256).hexdigest()

    def detach(self, request: gr.Request | None) -> None:
        """A page closed (or reloaded): free what its session holds in memory once no other page uses it. Its
        concepts stay on disk, so the next page of the same browser finds them."""
        session = self.session_of(request)
        self._browsers.pop(getattr(request, "session_hash", None) or "", None)
        if session not in self._browsers.values():
            self.forget_session(session)

    def forget_session(self, session: str) -> None:
        """Drop what a session keeps in memory: its concepts (their files stay), training run, thumbnails and flags."""
        self.library.drop_session(session)
        self.sessions.forget(session)

    def expire_sessions(self) -> None:
        """Delete what sessions unused for SESSION_DAYS kept (their folders and concepts), at most every
        EXPIRE_EVERY_S: at start and then at jobs' starts, so that sessions of API clients, which never load a page,
        expire too."""
        now = time.monotonic()
        if self._expired_at is not None and now - self._expired_at < EXPIRE_EVERY_S:
            return
        self._expired_at = now
        self.sessions.expire()
        self.library.expire_sessions(self.sessions.disk.keep_s)

    def train_step_limit(self) -> int:
        """The most steps a training run may take on the loaded model (launch.py --max-train-steps, else by size)."""
        return train_step_limit(self.model, self.limits.max_train_steps)

    def check_train_steps(self, steps, what: str = "Steps") -> None:
        """TrainStepsError (one line) when a run of `steps` would pass `train_step_limit`."""
        check_train_steps(int(steps), self.train_step_limit(), what)

    def entries(self, session: str) -> list[LibraryEntry]:
        """Library files and this session's concepts (words and LoRAs), each with whether it fits the loaded model
        and why not: judged by the model's encoder widths, by the checks a request makes."""
        model = self.model
        return self.library.entries(model.encoder_dims, session, model_name=model.name)

    def concept_choices(self, session: str) -> list[tuple[str, str]]:
        """A concept picker's (label, value) choices: every concept of every kind this session can use with the
        loaded model; the value is what picking it writes into the prompt (`LibraryEntry.prompt_text`: a word, a
        pivotal file's word, which brings its LoRA, or `<lora:name:1>`)."""
        return [(entry.token if entry.kind == "word" else f"{entry.token} ({entry.kind})", entry.prompt_text)
                for entry in self.entries(session) if entry.fits]

    def describe_memory(self) -> str:
        """The memory mode and what it does on the device the model is on."""
        chosen = preset(self.memory_mode)
        auto = f"auto → {chosen.name}" if self.memory_mode == "auto" else chosen.name
        return f"{auto}: {chosen.explain(self.model.device)}"

    def request_for(self, req_fields: dict, session: str) -> GenerateRequest:
        """The engine request for a form's fields, with the concepts its prompts name; a warning for a word written
        like a concept that names none (the model reads it as plain text)."""
        req, unknown = request_for(req_fields, self.library, session)
        if unknown:
            gr.Warning(html.escape(f"No concept called {', '.join(unknown)} in the library or this session: "
                                   "it is read as plain words. Check the spelling or train/import it first."))
        return req

    def render_streamed(self, req: GenerateRequest, session: str) -> Iterator[GenerationUpdate]:
        """The GPU part of every generation: plain values in, plain updates out (see `on_device`)."""
        yield from generation_updates(self.model, req, self.sessions.get(session))

    def stream(self, req_fields: dict, session: str, request: gr.Request | None = None,
               progress: gr.Progress | None = None) -> Iterator[GenerationUpdate]:
        """Generate a form's fields for `session`: every step (reported to `progress`), then the saved pictures.
        Engine errors become one gr.Error line (`request`: who asked, which decides how it is written)."""
        with as_user_errors(request):
            # Concepts are looked up here, in the server process, where the session's concepts live. Closing this
            # iterator early (Cancel in the browser) closes the run, which stops the engine.
            with closing(self.on_device(self.request_for(req_fields, session), session)) as updates:
                for update in updates:
                    if progress is not None and update.paths is None:
                        progress((update.step, update.total), unit="steps")
                    yield update

    def run_generate(self, req_fields: dict, session: str, progress: gr.Progress | None = None,
                     request: gr.Request | None = None) -> list[str]:
        """`stream` to its end: the saved pictures' paths (for the tabs that show only the result)."""
        paths: list[str] = []
        for update in self.stream(req_fields, session, request, progress):
            paths = update.paths if update.paths is not None else paths
        return paths


def seed_or_random(value) -> int | None:
    """UI seed field: -1 (RANDOM_SEED, or empty) means a random seed; any other number goes to the engine as it is,
    which says what range a seed must be in (check_seed)."""
    return None if value is None or int(value) == RANDOM_SEED else int(value)


def guidance_or_default(value) -> float | None:
    """UI guidance field: 0 (or empty) means the loaded model's own (`ModelFamily.default_guidance`, diffusers'
    pipeline default for its family), which the engine takes for a request without guidance."""
    return float(value) if value else None


def size_or_native(value) -> int | None:
    """UI size field: 0 (or empty) means the model's native size."""
    return int(value) if value else None

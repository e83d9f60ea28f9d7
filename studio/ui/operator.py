"""Operator and user roles: who may change what every user of a studio gets.

Loading or switching the model, its memory mode and the CLIP model an evaluation loads change the server for
everyone (or read whatever the server can reach), so they are operator actions; generating, training and the library
are every user's. The role is decided once, at start (`launch.py`, `Operator.for_server`):

- **Public** (bound to anything but loopback, `--share`, or a Hugging Face Space, where SPACE_ID is set): nothing is
  switched unless the operator starts the studio with a secret, `--admin-token TOKEN` (or STUDIO_ADMIN_TOKEN). Then
  the Model tab asks for it (compared in constant time) and offers only the models the operator listed (`--models`),
  by name: no client names a server path or a hub id, and a refusal is the same line whatever was asked for.
- **Local** (127.0.0.1 / localhost / ::1, no `--share`, not a Space, no token): the studio is its owner's, and its own
  page switches models without a secret, from the list or by typing any hub id, folder or file. A gradio_client
  script is refused as on a public studio (no token: no switching), so scripts that follow the API examples never
  change the model under the page. That line is a convention, not a wall: anyone who can reach loopback can send
  what the page sends; `--admin-token` makes a local studio ask for the secret too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from studio.ui.state import is_api_client, user_error

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MIN_TOKEN_LENGTH = 12  # a secret anyone on the internet may guess at: 12 random characters are 70+ bits
DEMO_CHOICE = "demo"  # the name of the built-in demo model in the default list
# A model's name in the list: what the Model tab shows and a client sends; never a path (no / or :).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+-]{0,63}")

SWITCHING_OFF = ("Switching the model is off on this server: it changes every user's pictures, so only the "
                 "operator may, with the operator token the studio was started with.")
WRONG_TOKEN = ("The operator token is missing or wrong: switching the model changes every user's pictures, so it "
               "needs the token this studio was started with (--admin-token).")


def parse_models(spec: str | None) -> dict[str, str]:
    """The operator's model choices from `--models`: `name=source,name=source` (an empty source: the built-in demo)
    or a file of `name=source` lines (blank lines and # comments skipped). Names are what users pick; ValueError with
    the offending entry when a name is not one (letters, digits, space . _ + -) or comes twice."""
    spec = (spec or "").strip()
    if not spec:
        return {}
    if "=" not in spec or Path(spec).is_file():
        if not Path(spec).is_file():
            raise ValueError(f"--models {spec!r}: give name=source pairs (e.g. demo=,sd15=stable-diffusion-v1-5/"
                             "stable-diffusion-v1-5) or a file of name=source lines")
        entries = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines()]
        entries = [line for line in entries if line and not line.startswith("#")]
    else:
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    models: dict[str, str] = {}
    for entry in entries:
        name, equals, source = (part.strip() for part in entry.partition("="))
        if not equals or not MODEL_NAME.fullmatch(name):
            raise ValueError(f"--models entry {entry!r}: write name=source, the name in letters, digits, spaces and "
                             ". _ + - (at most 64)")
        if name in models:
            raise ValueError(f"--models names {name!r} twice: give each model its own name")
        models[name] = source
    return models


@dataclass(frozen=True)
class Operator:
    """What this studio's operator allows. `token`: the secret of operator actions (None: none is accepted);
    `models`: the model choices, name -> source ("" is the built-in demo); `local`: a studio only its own machine
    reaches, whose page acts without the secret and may also name any hub id, folder or file. The default, an
    Operator(), switches nothing."""

    token: str | None = field(default=None, repr=False)  # never in a log line
    models: dict[str, str] = field(default_factory=dict)
    local: bool = False

    @classmethod
    def for_server(cls, host: str, share: bool, token: str | None = None, models: dict[str, str] | None = None,
                   startup_model: str | None = None) -> "Operator":
        """The roles of a studio served on `host` (with a gradio.live link when `share`): see the module docstring.
        The choices are `models`, or the demo; the model it starts with is added when the list lacks it."""
        token = token or None
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the operator token has {len(token)} characters: give at least {MIN_TOKEN_LENGTH} "
                             "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
        choices = dict(models or {DEMO_CHOICE: ""})
        if startup_model and startup_model not in choices.values():
            choices[Path(startup_model).name or startup_model] = startup_model
        local = token is None and host in LOOPBACK and not share and not os.environ.get("SPACE_ID")
        return cls(token=token, models=choices, local=local)

    @property
    def switching(self) -> bool:
        """Whether anyone may switch models here at all."""
        return self.token is not None or self.local

    def owns_page(self, request: gr.Request | None) -> bool:
        """Whether `request` is the local studio's own page, which acts as the operator without the secret."""
        return self.local and request is not None and not is_api_client(request)

    def check(self, request: gr.Request | None, token: str | None) -> None:
        """Raise the one-line gr.Error for a request that may not act as the operator (before anything it asked for
        is looked at, so a refusal tells nothing about the server's files)."""
        if self.owns_page(request):
            return
        if self.token is None:
            raise user_error(SWITCHING_OFF, request)
        # Digests first: compare_digest then compares equal lengths, and the token's length stays unknown too.
        given = hashlib.sha256((token or "").encode("utf-8")).digest()
        if not hmac.compare_digest(given, hashlib.sha256(self.token.encode("utf-8")).digest()):
            raise user_error(WRONG_TOKEN, request)

    def name_of(self, source: str) -> str | None:
        """The listed name of a model `source`, None when it is not in the list."""
        return next((name for name, listed in self.models.items() if listed == source), None)

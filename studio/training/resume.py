"""Training state beside each file the trainer writes, so a run can go on exactly where it stopped.

Every `<token>-stepN.safetensors` (and the final or cancelled `<token>.safetensors`) gets a sidecar
`<same name>.trainstate` (a dreambooth model folder `<folder>` gets `<folder>.trainstate` beside it): a safetensors
file (never pickle) holding the Adam moments and step count and the value of every trainable tensor (the word's
vectors, the method's weights), the initial vectors, the noise generator's state, and as metadata the data sampler's state, the step and what the vectors
belong to (token, base model, family, dimensions). The sidecar is not named `.safetensors` so that concept
libraries scanning the folder do not list it as a concept.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from studio.engine.files import atomic_write
from studio.engine.learned.lora import PARTS
from studio.training.data import TrainError

STATE_SUFFIX = ".trainstate"
STATE_FORMAT = "studio-train-state/1"


@dataclass
class TrainState:
    """Everything besides the vectors themselves that the loop needs to continue bit for bit."""

    step: int
    token: str
    base_model: str
    family: str
    dims: dict[str, int]
    init: dict[str, torch.Tensor]  # encoder key -> the vectors at step 0 (for the regularization term)
    adam: dict[str, dict[str, torch.Tensor]]  # tensor name -> {"step", "exp_avg", "exp_avg_sq"}
    noise_rng: torch.Tensor  # torch.Generator.get_state()
    data_rng: tuple  # random.Random.getstate()
    scaler: dict | None = None  # torch.amp.GradScaler.state_dict() when training in fp16
    method: str = "ti"
    # tensor name -> value: the vectors by encoder key ("text_encoder"), the weights by their name ("unet.…");
    # empty in sidecars written before the weight-tuning methods (the vectors are then read from the concept file)
    params: dict[str, torch.Tensor] | None = None
    scores: list | None = None  # stop when learned: [(step, score)] so far


def state_path(checkpoint: Path) -> Path:
    """The sidecar of `checkpoint`: `thing-step200.safetensors` -> `thing-step200.safetensors.trainstate`."""
    return checkpoint.with_name(checkpoint.name + STATE_SUFFIX)


def save_state(checkpoint: Path, state: TrainState) -> Path:
    """Write `state` beside `checkpoint` (atomically: a crash leaves the old sidecar or none)."""
    tensors = {"noise_rng": state.noise_rng.contiguous()}
    for key, vec in state.init.items():
        tensors[f"init.{key}"] = vec.detach().cpu().contiguous()
    for key, moments in state.adam.items():
        for name, value in moments.items():
            tensors[f"adam.{key}.{name}"] = value.detach().cpu().reshape(-1).contiguous()
    for key, value in (state.params or {}).items():
        tensors[f"param.{key}"] = value.detach().cpu().contiguous()
    version, internal, gauss = state.data_rng
    meta = {"format": STATE_FORMAT, "step": str(state.step), "token": state.token, "base_model": state.base_model,
            "family": state.family, "dims": json.dumps(state.dims),
            "data_rng": json.dumps([version, list(internal), gauss]),
            "scaler": json.dumps(state.scaler), "method": state.method, "scores": json.dumps(state.scores or [])}
    return atomic_write(state_path(checkpoint), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_state(checkpoint: Path) -> TrainState:
    """Read the sidecar of `checkpoint`; TrainError when there is none or it is not a studio training state."""
    path = state_path(checkpoint)
    if not path.is_file():
        raise TrainError(f"{checkpoint.name} has no training state beside it ({path.name}): only files written by "
                         "`studio train` (with --save-every for step checkpoints) can be resumed; start a new run "
                         "instead")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != STATE_FORMAT:
        raise TrainError(f"{path.name} is not a studio training state (format {meta.get('format')!r}, "
                         f"expected {STATE_FORMAT!r}); start a new run")
    tensors = load_file(str(path))
    init = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("init.")}
    params = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("param.")}
    adam: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("adam."):
            key, field = name.split(".", 1)[1].rsplit(".", 1)  # weight names have dots; Adam's fields none
            shape = (init.get(key) if key in init else params[key]).shape
            adam.setdefault(key, {})[field] = value.reshape(()) if field == "step" else value.reshape(shape)
    version, internal, gauss = json.loads(meta["data_rng"])
    return TrainState(step=int(meta["step"]), token=meta["token"], base_model=meta["base_model"],
                      family=meta["family"], dims=json.loads(meta["dims"]), init=init, adam=adam,
                      noise_rng=tensors["noise_rng"], data_rng=(version, tuple(internal), gauss),
                      scaler=json.loads(meta["scaler"]), method=meta.get("method", "ti"), params=params,
                      scores=[tuple(x) for x in json.loads(meta.get("scores", "[]"))])


def find_checkpoint(resume: str | Path, token: str) -> Path:
    """`resume` itself when it is a file; in a folder, the resumable file of `token` with the most steps."""
    path = Path(resume)
    if path.is_file() or state_path(path).is_file():  # a file, or a dreambooth checkpoint folder with its sidecar
        return path
    if not path.is_dir():
        raise TrainError(f"nothing to resume at {path}: give a <token>-stepN.safetensors file or its folder")
    best: tuple[int, float, Path] | None = None
    for sidecar in path.glob(f"*{STATE_SUFFIX}"):
        checkpoint = sidecar.with_name(sidecar.name[: -len(STATE_SUFFIX)])
        if not checkpoint.exists():
            continue
        with safe_open(str(sidecar), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT or meta.get("token") != token:
            continue
        rank = (int(meta["step"]), checkpoint.stat().st_mtime, checkpoint)
        if best is None or rank[:2] > best[:2]:
            best = rank
    if best is None:
        raise TrainError(f"no checkpoint of {token} to resume in {path}: it needs a <token>-stepN.safetensors with its "
                         f"{STATE_SUFFIX} beside it (written with --save-every N)")
    return best[2]


def check_matches(state: TrainState, checkpoint: Path, *, token: str, base_model: str, family: str,
                  dims: dict[str, int], n_vectors: int, total_steps: int, method: str = "ti") -> None:
    """Raise TrainError naming what differs when `state` cannot continue this run."""
    name = checkpoint.name
    if state.method != method:
        raise TrainError(f"{name} was trained with --method {state.method}, not {method}: use --method "
                         f"{state.method} to resume it")
    if state.token != token:
        raise TrainError(f"{name} was trained for {state.token}, not {token}: use --token {state.token} to resume it")
    if state.family != family or state.dims != dims:
        raise TrainError(f"{name} was trained on a {state.family} model with token dimensions {state.dims}, but the "
                         f"loaded model is {family} with {dims}: load the model it was trained on ({state.base_model})")
    if state.base_model != base_model:
        raise TrainError(f"{name} was trained on the model {state.base_model!r}, but {base_model!r} is loaded: "
                         f"load {state.base_model!r} to resume it")
    have = next(iter(state.init.values())).shape[-2] if state.init else n_vectors  # lora/dreambooth: no vectors
    if have != n_vectors:
        raise TrainError(f"{name} has {have} vectors per token but {n_vectors} were asked for: use --vectors {have}")
    if state.step >= total_steps:
        raise TrainError(f"{name} has already trained {state.step} steps; ask for more than {state.step} steps "
                         "to continue it")


def check_weights(state: TrainState, shapes: dict[str, torch.Size], checkpoint: Path) -> None:
    """Raise TrainError when the method's weights of this run (`shapes`: name -> shape) are not the ones `state`
    holds: another rank, other LoRA targets, a text-encoder LoRA on one side only."""
    held = {name: value.shape for name, value in (state.params or {}).items()
            if "." in name and name.split(".", 1)[0] in PARTS}  # not the word's vectors ("text_encoder", "image0.…")
    if held == shapes:
        return
    name = checkpoint.name
    encoders = [any(key.startswith("text_encoder") for key in names) for names in (held, shapes)]
    if encoders[0] != encoders[1]:
        with_it = "with" if encoders[0] else "without"
        raise TrainError(f"{name} was trained {with_it} a text-encoder LoRA: resume it {with_it} --text-encoder-lora")
    differ = sorted(set(held) ^ set(shapes)) or sorted(k for k in held if held[k] != shapes[k])
    raise TrainError(f"{name} holds other LoRA weights than this run makes ({differ[0]}): resume it with the --rank, "
                     "--lora-targets and --text-encoder-rank it was trained with")


def restore_rngs(state: TrainState, generator: torch.Generator, data_rng: random.Random) -> None:
    """Put both random streams where they were when the checkpoint was written."""
    generator.set_state(state.noise_rng)
    data_rng.setstate(state.data_rng)

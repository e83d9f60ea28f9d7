"""Files written by the original Textual Inversion code (rinongal/textual_inversion) load safely and exactly.

That code saves `{"string_to_token": {"*": tensor(265)}, "string_to_param": nn.ParameterDict({"*": Parameter})}`
from a CUDA model. The files here are built the same way: torch.save of a real ParameterDict, its storages tagged
`cuda:0` the way torch.save tags a CUDA tensor, in the current layout (with `_keys`) and in the 2022 one (without).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import pytest
import torch

from studio.cli import main
from studio.engine.learned.registry import load_concept
from studio.engine.learned.word import ConceptError

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = ["with_keys", "without_keys"]


def paper_parameter_dict(vector: torch.Tensor, layout: str) -> torch.nn.ParameterDict:
    """The paper's `string_to_param`; "without_keys" holds the attributes torch of 2022 pickled for it."""
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vector.clone())})
    if layout == "without_keys":
        param = params._parameters["*"]
        params.__dict__.clear()
        params.__dict__.update(
            training=True, _parameters=OrderedDict({"*": param}), _buffers=OrderedDict(),
            _non_persistent_buffers_set=set(), _backward_hooks=OrderedDict(), _is_full_backward_hook=None,
            _forward_hooks=OrderedDict(), _forward_pre_hooks=OrderedDict(), _state_dict_hooks=OrderedDict(),
            _load_state_dict_pre_hooks=OrderedDict(), _modules=OrderedDict(), _initialized=True,
        )
    return params


def save_from_cuda(data: object, path: Path) -> Path:
    """torch.save `data` as from a GPU: every storage's persistent id says "cuda:0", the bytes are the same."""
    # torch.save asks location_tag(storage) for the device string it writes; a CUDA storage answers "cuda:0".
    with mock.patch("torch.serialization.location_tag", lambda storage: "cuda:0"):
        torch.save(data, path)
    return path


def paper_file(path: Path, vector: torch.Tensor, layout: str, **extra: object) -> Path:
    data = {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": paper_parameter_dict(vector, layout)}
    return save_from_cuda({**data, **extra}, path)


def pickle_bytes(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))


class RunsShell:
    """Unpickling this runs a shell command (the attack a shared .pt can carry)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_paper_file_saved_from_cuda_loads_exactly_as_a1111(tmp_path, layout):
    """Guards the paper's own files: ParameterDict (with or without `_keys`) from cuda:0 reads on a CPU, bit for bit."""
    vector = torch.randn(1, 768)
    path = paper_file(tmp_path / "embeddings_gs-6099.pt", vector, layout)
    raw = pickle_bytes(path)
    assert b"ParameterDict" in raw and b"cuda:0" in raw and b"cpu" not in raw
    assert (b"_keys" in raw) == (layout == "with_keys")
    with pytest.raises(Exception, match="ParameterDict"):  # what a plain weights-only load (diffusers') does
        torch.load(path, map_location="cpu", weights_only=True)

    concept = load_concept(path)

    assert concept.meta["source_format"] == "a1111"
    assert concept.token == "embeddings_gs-6099"
    vectors = concept.vectors["text_encoder"]
    assert type(vectors) is torch.Tensor and vectors.device.type == "cpu" and not vectors.requires_grad
    assert torch.equal(vectors, vector)


def test_loading_a_paper_file_leaves_torch_allowlist_unchanged(tmp_path):
    """Guards shared state: after our load, torch.load(weights_only=True) elsewhere still refuses a ParameterDict."""
    path = paper_file(tmp_path / "cat.pt", torch.randn(1, 768), "with_keys")
    load_concept(path)
    assert not any("ParameterDict" in str(entry) for entry in torch.serialization.get_safe_globals())
    with pytest.raises(Exception, match="ParameterDict"):
        torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cli_inspect_json_reads_a_paper_file(tmp_path, capsys, layout):
    """Guards `studio concepts inspect --json` on the paper's files: exit 0, a1111 format, one 768-wide vector."""
    path = paper_file(tmp_path / "style.pt", torch.randn(1, 768), layout)
    assert main(["concepts", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "a1111" and info["token"] == "style" and info["vectors"] == 1
    assert info["dims"] == {"text_encoder": 768} and info["family"] == "sd1"


@pytest.mark.parametrize("where", ["beside", "inside"])
def test_paper_file_with_a_payload_is_refused_and_nothing_runs(tmp_path, where):
    """Guards the allowlist: a ParameterDict file carrying os.system (beside it, or in its hooks) runs nothing."""
    marker = tmp_path / "pwned"
    payload = RunsShell(f"touch {shlex.quote(str(marker))}")
    if where == "beside":
        path = paper_file(tmp_path / "evil.pt", torch.randn(1, 768), "with_keys", name=payload)
    else:
        params = paper_parameter_dict(torch.randn(1, 768), "without_keys")
        params.__dict__["_forward_hooks"] = OrderedDict({0: payload})
        path = save_from_cuda({"string_to_param": params}, tmp_path / "evil.pt")
    assert b"system" in pickle_bytes(path)  # the payload really is in the file

    with pytest.raises(ConceptError, match=r"refused: .*\((posix|nt)\.system\); we never unpickle arbitrary objects"):
        load_concept(path)
    assert not marker.exists()


def test_cli_refuses_a_paper_file_with_a_payload_in_one_line(tmp_path):
    """Guards the CLI edge: the refusal is one stderr line, exit code 2, no traceback, and the command never ran."""
    marker = tmp_path / "pwned"
    path = paper_file(tmp_path / "evil.pt", torch.randn(1, 768), "without_keys",
                      name=RunsShell(f"touch {shlex.quote(str(marker))}"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "studio", "concepts", "inspect", str(path), "--json"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("studio concepts: error: evil.pt: refused:") and ".system)" in lines[0]
    assert not marker.exists()

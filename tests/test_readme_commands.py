"""README.md's commands run as written on a fresh copy of the repository, against the demo model (issue 29).

Each bash line in the README's code blocks (and its first Python snippet) runs in order in a copy holding only what
git hands out, plus what a newcomer brings: `pics/`, the five pictures of `assets/concepts/toy-plum/` as the README
says, and `my-cat.pt`, an AUTOMATIC1111 embedding for the demo model. Guards: a README command that fails or was
never run, a second example that silently replaces the first one's file, a run that trains all `--steps` though the
README says it stops once learned, and diffusers' safety-checker paragraph on every `studio generate`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from working_copy import REPO, copy_repository

pytestmark = pytest.mark.slow

README = REPO / "README.md"

# Commands that are not run here, by how they begin, and why. Every other line of a bash block runs.
NOT_RUN = {
    "pip install": "installs packages, then starts a server that runs until stopped: .ci/run installs the same way, "
                   "and tests/test_space.py serves the studio (app.py) and generates through it",
    "HF_HUB_OFFLINE=1 python -m pytest": "the test suite itself, which .ci/run runs",
    "accelerate launch": "two processes on SD 1.5 from the hub (not on this machine); "
                         "test_the_accelerate_example_parses checks its arguments instead",
}
PYTHON_NOT_RUN = {
    "from gradio_client import": "a client of a running `python launch.py`: tests/test_space.py calls /generate on a "
                                 "served studio, and tests/ui/ call every named endpoint",
}
DEMO_TOY = REPO / "assets" / "concepts" / "toy-plum"  # the README's "for the demo model, copy ..."
STEPS_UNTIL_LEARNED = 80  # README: "about 80 steps for a toy on the demo model"


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced code block of README.md, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def bash_commands(block: str) -> list[str]:
    """The commands of a bash block: continued lines joined, blank lines and comment lines left out."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def not_run_reason(text: str, reasons: dict[str, str]) -> str | None:
    return next((why for start, why in reasons.items() if text.startswith(start)), None)


def readme_steps() -> list[tuple[str, str]]:
    """("bash" | "python", text) for what runs, in README order."""
    steps = []
    for language, block in readme_blocks():
        if language == "bash":
            steps += [("bash", cmd) for cmd in bash_commands(block) if not_run_reason(cmd, NOT_RUN) is None]
        elif language == "python" and not_run_reason(block, PYTHON_NOT_RUN) is None:
            steps.append(("python", block))
    return steps


def write_a1111_embedding(path: Path, dims: int) -> None:
    """An AUTOMATIC1111 `.pt` embedding of 2 vectors, as files found on the web are laid out."""
    vectors = torch.randn(2, dims, generator=torch.Generator().manual_seed(0)) * 0.02
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 500,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)


@pytest.fixture(scope="module")
def newcomer_copy(tmp_path_factory) -> Path:
    """The repository as cloned, with `pics/` and `my-cat.pt` beside it."""
    root = copy_repository(tmp_path_factory.mktemp("readme"))
    (root / "pics").mkdir()
    for n, picture in enumerate(sorted(DEMO_TOY.glob("*.png")), start=1):
        shutil.copy(picture, root / "pics" / f"{n}.png")
    width = json.loads((root / "assets" / "demo-model" / "text_encoder" / "config.json").read_text())["hidden_size"]
    write_a1111_embedding(root / "my-cat.pt", width)
    return root


def run(step: tuple[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """One README step as a newcomer's shell runs it: this interpreter's `python` first on PATH, the hub offline, and
    the libraries' warnings at their default verbosity (the suite's conftest turns them down). torch gets one thread:
    on 2 cores shared with other work, its spinning threads made the pivotal example take over 600 s instead of 42."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    language, text = step
    if language == "python":
        (cwd / "readme_snippet.py").write_text(text)
        argv = [sys.executable, "readme_snippet.py"]
    else:
        argv = ["bash", "-c", text]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_every_readme_command_runs_as_written(newcomer_copy):
    steps = readme_steps()
    assert any("--method pivotal" in text for _, text in steps) and any(lang == "python" for lang, _ in steps)
    for step in steps:
        done = run(step, newcomer_copy)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"README command failed (exit {done.returncode}): {step[1]}\n{output[-3000:]}"
        if " generate " in step[1]:
            assert "safety checker" not in output, f"diffusers' safety-checker warning on: {step[1]}"
        for out in re.findall(r"--out (\S+\.png)", step[1]):
            assert (newcomer_copy / out).is_file(), f"{step[1]} wrote no {out}"
        if re.search(r"train .*--steps 400", step[1]):
            # README: --steps is an upper bound; the run stops once learned, about 80 steps on the demo toy
            steps_run = int(re.search(r"finished: (\d+) steps", output).group(1))
            assert STEPS_UNTIL_LEARNED // 2 <= steps_run <= STEPS_UNTIL_LEARNED * 2, output[-2000:]

    concepts = newcomer_copy / "concepts"
    # The two train examples write two concepts: the pivotal one does not replace the first one's word.
    assert {"my-toy.safetensors", "my-toy-pivotal.safetensors"} <= {p.name for p in concepts.iterdir()}
    assert (concepts / "my-toy.safetensors.trainstate").is_file()  # the README says what it is
    assert (newcomer_copy / "my-cat.safetensors").is_file()


def test_every_skipped_command_is_still_in_the_readme():
    """The lists of commands not run name only commands the README has, so a reason cannot outlive its command."""
    bash = [cmd for lang, block in readme_blocks() if lang == "bash" for cmd in bash_commands(block)]
    python = [block for lang, block in readme_blocks() if lang == "python"]
    for start in NOT_RUN:
        assert any(cmd.startswith(start) for cmd in bash), f"no README command begins with {start!r}"
    for start in PYTHON_NOT_RUN:
        assert any(block.startswith(start) for block in python), f"no README snippet begins with {start!r}"


def test_the_accelerate_example_parses():
    """Both tools accept the multi-process example's arguments, its batch divides by the process count, and it names
    the Stable Diffusion 1.5 repository the rest of the README names."""
    from accelerate.commands.launch import launch_command_parser

    from studio.cli import build_parser

    [command] = [cmd for lang, block in readme_blocks() if lang == "bash" for cmd in bash_commands(block)
                 if cmd.startswith("accelerate launch")]
    launch = launch_command_parser().parse_args(shlex.split(command)[2:])
    assert launch.module and launch.training_script == "studio"
    train = build_parser().parse_args(launch.training_script_args)
    assert train.batch % launch.num_processes == 0
    assert train.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "runwayml" not in README.read_text()

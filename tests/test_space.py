"""The Hugging Face Space, simulated (issue 29): a fresh virtual environment holding only requirements.txt (torch
from this machine's pin first, as .ci/run installs it), the repository as git hands it out, `python app.py` from its
root, and a gradio_client that generates a picture through it. Before requirements.txt existed the Space died at
`import torch`; before the gradio pin it could start a Gradio 5 that rejects the studio's Gradio 6 arguments.

The fresh install takes 1-3 minutes with pip's cache (measured by hand: 62 s; 175 s with the 2 cores loaded by other
work), so the test does the real thing rather than a dry-run resolution in the suite's own environment.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from working_copy import REPO, copy_repository

TORCH_PIN = "torch==2.13.0"  # the CPU build on this machine's disk (.ci/run); a bare `torch` would pull CUDA's
README_TEXT = (REPO / "README.md").read_text()
START_LIMIT_S = 240  # app.py to a served page: ~20 s here (imports, demo model, build_app) on a quiet machine


def front_matter() -> dict[str, str]:
    """README.md's Space settings: the `key: value` lines between its first two `---` lines."""
    block = README_TEXT.split("---\n")[1]
    return {key: value.strip().strip('"') for key, value in re.findall(r"^(\w+): *(.*)$", block, flags=re.M)}


def requirements() -> dict[str, Requirement]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    parsed = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(req.name): req for req in parsed}


def project_dependencies() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(req.name): req for req in map(Requirement, project["dependencies"])}



def test_requirements_pin_versions_inside_pyprojects_ranges():
    """One list of what the studio needs (pyproject), and the Space's pins (requirements.txt) inside it."""
    pins, ranges = requirements(), project_dependencies()
    assert pins.keys() == ranges.keys(), "requirements.txt and pyproject.toml name different packages"
    for name, pin in pins.items():
        if name == "torch":  # its build follows the hardware: a range, the same in both
            assert pin.specifier == ranges[name].specifier
            continue
        [exact] = [spec for spec in pin.specifier if spec.operator == "=="]
        assert ranges[name].specifier.contains(exact.version), f"{pin} is outside pyproject's {ranges[name]}"


def test_the_front_matter_starts_the_pinned_gradio_on_a_supported_python():
    settings = front_matter()
    [gradio] = requirements()["gradio"].specifier
    assert settings["sdk"] == "gradio" and settings["app_file"] == "app.py"
    assert settings["sdk_version"] == gradio.version
    tomllib = pytest.importorskip("tomllib")
    requires_python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Version(settings["python_version"]) in Requirement(f"python{requires_python}").specifier


def load_app_module():
    spec = importlib.util.spec_from_file_location("space_app", REPO / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # starts nothing: the server starts only under `python app.py`
    return module


def test_app_keeps_data_in_the_spaces_persistent_storage_when_it_has_one(tmp_path):
    app = load_app_module()
    assert app.storage_args(tmp_path) == ["--data", str(tmp_path / "studio-data"),
                                          "--concepts", str(tmp_path / "concepts")]
    assert app.storage_args(tmp_path / "no-storage") == []  # launch.py's defaults beside the repository


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_served(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll `url` until it answers; fail at once if the server exits, or at START_LIMIT_S."""
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"app.py exited with {server.returncode} before serving:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"app.py did not answer on {url} within {START_LIMIT_S} s:\n{log.read_text()[-4000:]}")


def pip(venv: Path, *args: str) -> None:
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_a_fresh_space_installs_requirements_starts_app_py_and_generates(tmp_path):
    from gradio_client import Client
    from PIL import Image

    # 1. The Space's environment: nothing but torch and requirements.txt (no editable install of the studio).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    space = copy_repository(tmp_path / "space")
    log = tmp_path / "app.log"
    server = None
    try:
        # --no-compile: a Space compiles what it imports when it first imports it; compiling every installed file
        # (torch alone has thousands) is most of an install from the cache, and checks nothing here.
        pip(venv, "install", "-q", "--no-compile", TORCH_PIN)
        pip(venv, "install", "-q", "--no-compile", "-r", str(space / "requirements.txt"))
        pip(venv, "check")
        # 2. The Space's start: `python app.py` in the repository's root, the port from GRADIO_SERVER_PORT.
        port = free_port()
        env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
               "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)
        with log.open("w") as out:
            server = subprocess.Popen([str(venv / "bin" / "python"), "app.py"], cwd=space, env=env, stdout=out,
                                      stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        wait_until_served(url, server, log)
        # 3. A visitor's first picture, through the named endpoint.
        gallery = Client(url, verbose=False).predict(prompt="a red circle on a blue background", negative="",
                                                     seed=1, steps=2, count=1, api_name="/generate")
        assert len(gallery) == 1
        with Image.open(gallery[0]["image"]) as picture:
            assert picture.format == "PNG" and min(picture.size) > 0
        assert server.poll() is None, log.read_text()[-4000:]
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(venv, ignore_errors=True)  # 1.5 GB; pytest keeps its last three runs' temporary folders

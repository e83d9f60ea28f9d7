"""Shared fixtures: tiny random Stable Diffusion pipelines built from configs (no hub), saved once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
COMPAT_DIR = REPO.parent / "shared" / "compat" / "embeddings"
DEMO_MODEL_DIR = REPO / "assets" / "demo-model"
if str(REPO) not in sys.path:  # benchmarks/architectures.py (random-weight pipelines) imports as benchmarks.*
    sys.path.append(str(REPO))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """`{"sd1"|"sd2"|"sdxl": folder}`: tiny random pipelines saved as diffusers folders."""
    from benchmarks.architectures import build_random_pipeline

    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {}
    for family in ("sd1", "sd2", "sdxl"):
        pipe = build_random_pipeline(family, "tiny", tokenizer_dir=root / f"tok-{family}")
        pipe.save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture(scope="session")
def flow_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """`{"sd3"|"flux": folder}`: tiny random SD3 and Flux pipelines (transformer denoisers, T5) saved as folders."""
    from benchmarks.architectures import build_random_pipeline

    root = tmp_path_factory.mktemp("tiny-flow-models")
    dirs = {}
    for family in ("sd3", "flux"):
        build_random_pipeline(family, "tiny", tokenizer_dir=root / f"tok-{family}").save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture(scope="session")
def flow_models(flow_model_dirs) -> dict:
    """`{"sd3"|"flux": LoadedModel}` of `flow_model_dirs`, loaded once through ModelManager."""
    from studio.engine.models import ModelManager

    return {family: ModelManager().load(folder) for family, folder in flow_model_dirs.items()}


@pytest.fixture(scope="session")
def compat_dir() -> Path:
    """The shared corpus of real embedding files; tests using it skip when it is absent."""
    if not COMPAT_DIR.is_dir():
        pytest.skip(f"compatibility corpus not present at {COMPAT_DIR}")
    return COMPAT_DIR


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    if not (DEMO_MODEL_DIR / "model_index.json").is_file():
        pytest.skip("the demo model has not been built yet (python -m studio.demo.build)")
    return DEMO_MODEL_DIR


@pytest.fixture(scope="session")
def demo_encoder(demo_model_dir, tmp_path_factory) -> Path:
    """The demo encoder's IP-Adapter file (image_encoder/ beside it) after 3 steps of its recipe (~8 s): what the
    image-concept tests encode with, so none of them needs the shipped assets/demo-encoder."""
    from studio.demo.encoder import EncoderRecipe, build

    return build(tmp_path_factory.mktemp("demo-encoder"), EncoderRecipe(steps=3, batch=2)) / "ip-adapter.safetensors"


@pytest.fixture()
def pictures(tmp_path) -> Path:
    """A folder of four small concept pictures, shared by the trainer, resume, memory and training-job tests."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        arr = np.zeros((48, 48, 3), np.uint8)
        arr[8:40, 8:40] = (200, 40 + 20 * k, 40)
        arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"p{k}.png")
    return folder


# End-to-end modules: a real browser, CLI runs that load and train, training + evaluation, the demo build. They run in
# CI (the whole suite, ~2.5 min on 2 cores); `pytest -m "not slow"` leaves them out for a quick loop while editing.
SLOW_MODULES = {"test_browser.py", "test_ui_load.py", "test_cli_generate_train.py", "test_runner.py",
                "test_build_recipe.py", "test_ui_evaluate.py", "test_train_resume.py"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

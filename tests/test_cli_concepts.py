"""`python -m studio concepts inspect|convert` as a user runs it (subprocess): output, files, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word import Concept

REPO = Path(__file__).resolve().parents[1]


def studio(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "studio", "concepts", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def sdxl_file(tmp_path: Path) -> tuple[Path, Concept]:
    concept = Concept("<xl>", {"text_encoder": torch.randn(2, 768), "text_encoder_2": torch.randn(2, 1280)},
                      {"init_text": "toy", "steps": "100"})
    return save_concept(concept, tmp_path / "<xl>.safetensors"), concept


def test_inspect_json_reports_format_token_vectors_dims_family_and_metadata(tmp_path):
    path, _ = sdxl_file(tmp_path)
    result = studio("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "studio" and info["token"] == "<xl>" and info["vectors"] == 2
    assert info["dims"] == {"text_encoder": 768, "text_encoder_2": 1280}
    assert info["family"] == "sdxl" and info["likely_model"] == "SDXL"
    assert info["metadata"]["init_text"] == "toy" and info["metadata"]["steps"] == "100"


def test_inspect_text_for_an_a1111_file(tmp_path):
    path = save_concept(Concept("neg", {"text_encoder": torch.randn(3, 1024)}, {"steps": "7"}), tmp_path / "neg",
                        format="a1111")
    result = studio("inspect", path)
    assert result.returncode == 0, result.stderr
    assert "format:  a1111" in result.stdout and "token:   neg" in result.stdout
    assert "vectors: 3 x (text_encoder 1024)" in result.stdout and "SD 2.x" in result.stdout


def test_convert_to_each_form_keeps_vectors_bitwise(tmp_path):
    source, concept = sdxl_file(tmp_path)
    for fmt in ("diffusers", "a1111", "kohya", "studio"):
        out = tmp_path / fmt / "<xl>.safetensors"
        result = studio("convert", source, "--to", fmt, out)
        assert result.returncode == 0, result.stderr
        assert f"wrote {out}" in result.stdout
        back = load_concept(out)
        for key, tensor in concept.vectors.items():
            assert torch.equal(back.vectors[key], tensor), (fmt, key)
    assert (tmp_path / "diffusers" / "<xl>_2.safetensors").is_file()


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    nan = torch.zeros(1, 768)
    nan[0, 0] = float("nan")
    save_file({"emb_params": nan}, tmp_path / "nan.safetensors")
    save_file({"emb_params": torch.zeros(1, 768)}, tmp_path / "ok.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    cases = [
        (("inspect", tmp_path / "missing.pt"), "no such file"),
        (("inspect", tmp_path / "junk.pt"), "not a readable torch file"),
        (("inspect", tmp_path / "nan.safetensors"), "NaN"),
        (("convert", tmp_path / "ok.safetensors", "--to", "a1111", tmp_path / "out.safetensors"), "end in .pt"),
    ]
    for args, expected in cases:
        result = studio(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert lines[0].startswith("studio concepts: error:") and expected in lines[0]

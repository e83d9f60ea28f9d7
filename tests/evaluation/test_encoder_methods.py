"""`studio eval --methods ti,encoder,encoder+ti` (studio/evaluation/runner.py: `encode_method`, `learn_method`) on the
demo model and world with a 3-step demo encoder.

What it guards: the encoder "method" encodes instead of training and is scored on the same prompts and seeds as TI
(identity and prompt fidelity with intervals, its margin over TI), its time and file size recorded like a training
run's; encoder+ti trains from it and writes one image concept; a missing adapter is one line before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

from studio.cli import main
from studio.demo.concept_sets import CONCEPTS_DIR


def test_encoder_methods_are_scored_beside_ti_with_time_and_size(demo_encoder, tmp_path, capsys):
    out, work = tmp_path / "eval.json", tmp_path / "work"
    assert main(["eval", "--concepts", str(CONCEPTS_DIR / "toy-plum"), "--quick", "--skip-compliance", "--methods",
                 "ti,encoder,encoder+ti", "--adapter", str(demo_encoder), "--seed", "3", "--train-steps", "4",
                 "--work-dir", str(work), "--out", str(out)]) == 0
    methods = json.loads(out.read_text())["methods"]
    assert list(methods) == ["ti", "encoder", "encoder+ti"]
    for m in methods.values():
        for measure in ("identity", "prompt_fidelity"):
            assert m[measure]["n"] == 2 and m[measure]["low"] <= m[measure]["mean"] <= m[measure]["high"]
    encoder, tuned = methods["encoder"], methods["encoder+ti"]
    assert encoder["train_steps"] == 0 and 0 < encoder["train_seconds"] < methods["ti"]["train_seconds"]
    written = work / "methods" / "encoder" / "toy-plum.safetensors"
    assert encoder["file_bytes"] == written.stat().st_size and encoder["vs_ti"]["identity"]["n"] == 2
    assert encoder["identity"]["mean"] != methods["ti"]["identity"]["mean"]  # another concept, other pictures
    assert tuned["train_steps"] >= 1 and (work / "methods" / "encoder+ti" / "toy-plum.safetensors").is_file()
    assert "\n  encoder " in capsys.readouterr().out


def test_a_missing_adapter_is_one_line_before_any_work(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "ip-adapter.safetensors"
    assert main(["eval", "--concepts", "toy-plum", "--methods", "ti,encoder", "--adapter", str(missing),
                 "--out", str(tmp_path / "eval.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "studio eval --methods encoder needs the IP-Adapter" in err
    assert not Path(tmp_path / "eval.json").exists()

"""benchmarks/methods_speed.py --dry-run: the command lines it would time name diffusers' scripts for the right
method and give both sides the same steps, batch, rank, learning rates, precision and seed (issue 17, item 4).

Runs no training (the benchmark itself takes minutes); skips when diffusers' scripts have not been extracted."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import methods_speed

BENCHMARK = Path(methods_speed.__file__)


def option(cmd: list[str], name: str) -> str:
    """The value after `name` in a command line (fails the test when the option is missing)."""
    assert name in cmd, f"{name} missing from {shlex.join(cmd)}"
    return cmd[cmd.index(name) + 1]


@pytest.fixture(scope="module")
def dry_run() -> dict[str, list[str]]:
    """`{"lora reference": argv, "lora studio": argv, "lora floor": argv, ...}` from one --dry-run."""
    missing = [m for m in methods_speed.REF_SCRIPTS
               if not methods_speed.reference_script(methods_speed.DEFAULT_REF_DIR, m).is_file()]
    if missing:
        pytest.skip(f"diffusers' scripts for {', '.join(missing)} not in {methods_speed.DEFAULT_REF_DIR} "
                    f"(benchmarks/methods_speed.py --diffusers-git DIR extracts them)")
    done = subprocess.run([sys.executable, str(BENCHMARK), "--dry-run", "--methods", "lora,pivotal", "--steps", "7",
                           "--batch", "3", "--rank", "2", "--unet-lr", "0.0002", "--word-lr", "0.004", "--vectors", "3",
                           "--seed", "11"], capture_output=True, text=True, timeout=60, check=True)
    lines = done.stdout.strip().splitlines()
    commands, label = {}, None
    for line in lines[1:]:  # the first line says how each runs
        if line.startswith("# "):
            label = line[2:]
        else:
            commands[label] = shlex.split(line)
    return commands


def test_each_method_runs_its_own_diffusers_script(dry_run):
    assert Path(dry_run["lora reference"][1]).name == "train_dreambooth_lora.py"
    assert Path(dry_run["pivotal reference"][1]).name == "train_dreambooth_lora_sd15_advanced.py"
    assert dry_run["lora studio"][1:5] == ["-m", "studio", "train", "--model"]
    assert option(dry_run["lora studio"], "--method") == "lora"
    assert option(dry_run["pivotal studio"], "--method") == "pivotal"


def test_both_sides_train_the_same_run(dry_run):
    """The same model, steps, batch, rank, LoRA learning rate and seed on each side, fp32, no prior preservation."""
    for method in ("lora", "pivotal"):
        ref, ours = dry_run[f"{method} reference"], dry_run[f"{method} studio"]
        assert option(ref, "--pretrained_model_name_or_path") == option(ours, "--model")
        assert option(ref, "--instance_data_dir") == option(ours, "--images")
        assert option(ref, "--max_train_steps") == option(ours, "--steps") == "7"
        assert option(ref, "--train_batch_size") == option(ours, "--batch") == "3"
        assert option(ref, "--rank") == option(ours, "--rank") == "2"
        assert float(option(ref, "--learning_rate")) == float(option(ours, "--unet-lr")) == 2e-4
        assert option(ref, "--seed") == option(ours, "--seed") == "11"
        assert option(ref, "--mixed_precision") == option(ours, "--mixed-precision") == "no"
        assert option(ours, "--memory") == "fast"
        assert "--with_prior_preservation" not in ref and "--prior-preservation" not in ours
        assert "--validation_prompt" not in ref and "--push_to_hub" not in ref
        assert int(option(ref, "--checkpointing_steps")) > 7  # no checkpoint inside the timed steps


def test_lora_prompt_and_pivotal_word(dry_run):
    """lora: "a photo of sks toy" on both sides; pivotal: the word learns every step with the same vectors and
    learning rate."""
    ref, ours = dry_run["lora reference"], dry_run["lora studio"]
    token, class_word = option(ours, "--token"), option(ours, "--class-word")
    assert option(ref, "--instance_prompt") == f"a photo of {token} {class_word}" == "a photo of sks toy"

    ref, ours = dry_run["pivotal reference"], dry_run["pivotal studio"]
    assert "--train_text_encoder_ti" in ref and "--train_text_encoder" not in ref
    assert option(ref, "--token_abstraction") in option(ref, "--instance_prompt")
    assert float(option(ref, "--train_text_encoder_ti_frac")) == 1.0
    assert option(ref, "--num_new_tokens_per_abstraction") == option(ours, "--vectors") == "3"
    assert float(option(ref, "--text_encoder_lr")) == float(option(ours, "--lr")) == 4e-3


def test_floor_trains_what_each_method_cannot_drop(dry_run):
    """The floor runs the same steps, batch and rank; only pivotal's floor also trains a word."""
    for method in ("lora", "pivotal"):
        floor = dry_run[f"{method} floor"]
        assert option(floor, "--child") == "floor"
        assert option(floor, "--steps") == "7" and option(floor, "--batch") == "3" and option(floor, "--rank") == "2"
    assert "--word" in dry_run["pivotal floor"] and "--word" not in dry_run["lora floor"]

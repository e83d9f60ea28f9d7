"""Paired pilots of world v3's levers (issue 28) at an equal CPU budget: each continues build 5 for the same minutes
on the same pictures' seed, and is scored on the same held-out individuals and captions, with seeds no choice used.

    PYTHONPATH=. python benchmarks/pilot.py baseline --minutes 25      # build 5 continued, no lever: the pair
    PYTHONPATH=. python benchmarks/pilot.py code --minutes 25          # lever 2c: the look code
    PYTHONPATH=. python benchmarks/pilot.py coarse+code --minutes 25   # levers combine with "+"

Levers (`LEVERS`; each a `world.WorldOptions` setting, docs/demo-model.md "World v3 levers"): `coarse` (1: looks at
the model's scale), `words` (2a: captions say part of a toy's look), `code` (2c: the look code). Per lever:
1. Build: `python -m studio.demo.build --init-from assets/demo-model --vae assets/demo-model/vae` with the recipe
   of the runs after build 5 (noise offset 0.1, lr 3e-4, half of all objects toys), the lever's options,
   `--minutes M --threads T`, into `<root>/pilot-<lever>/demo-model`.
2. Held-out Textual Inversion: `studio eval --model X --held-out 12 --seed S --skip-compliance` (default TI), in the
   model's own world (`DemoWorld.for_model`: its looks, and its best plain words; `studio eval` does the same).
3. Compliance: `studio eval --model X --skip-concepts --prompts 80 --seed S2` (world v2's captions for every lever).
4. Code levers: the code's reach, the same individuals drawn from their exact look codes against plain words: what
   a learned word could reach if it found the code (no training).
5. One table row: printed, appended to `<root>/pilot-table.md`, and written with every number to `row.json`.
The encoder's own check on the lever's looks (same-colour ROC AUC on 100 held-out individuals) goes in the row, so a
ruler that fails a new world shows.

Run alone on the machine: a 25-minute pilot with both threads takes ~31 minutes (build, then ~6 minutes of scoring).
`--quick` scores in miniature (`studio eval --quick`) for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from studio.demo import world
from studio.demo.concept_sets import load_concept_set
from studio.demo.evaluate import DemoJudge, DemoWorld
from studio.demo.identity import measure
from studio.demo.look_code import LookCode
from studio.engine.learned.word import Concept
from studio.engine.models import ModelManager
from studio.evaluation.config import EvalConfig
from studio.evaluation.drawing import generate_pictures
from studio.evaluation.report import write_json
from studio.evaluation.runner import run_evaluation
from studio.evaluation.stats import bootstrap_mean

ROOT = Path(__file__).resolve().parents[1]

# Each lever as the WorldOptions it sets; a share of 0.5: half of the toys' descriptions use it, so the model also
# keeps drawing a toy from "a red toy" alone (what plain words and a learned word's starting point say).
# `mostcode`: the code on most toy descriptions (the first pilot found half not learnt in 2,500 steps); a fifth
# still say "toy", so plain words and a new word's starting point keep their meaning.
LEVERS: dict[str, dict] = {"coarse": {"looks": "coarse"}, "words": {"look_words": 0.5}, "code": {"look_code": 0.5},
                           "mostcode": {"look_code": 0.8}}
BASELINE = "baseline"
# The recipe of the runs continued from build 5 in docs/demo-model.md (session 9), the same for every lever.
BUILD_RECIPE = ["--init-from", "assets/demo-model", "--vae", "assets/demo-model/vae", "--noise-offset", "0.1",
                "--lr", "3e-4", "--toy-rate", "0.5", "--snapshot-minutes", "0"]
# Seeds never used for a choice in docs/demo-model.md (3, 11, 17, 19, 23, 29 were).
EVAL_SEED, COMPLIANCE_SEED = 31, 37


def lever_options(lever: str) -> world.WorldOptions:
    """`baseline`, a lever of `LEVERS`, or levers joined by "+" ("coarse+code") as world options."""
    if lever == BASELINE:
        return world.WORLD_V2
    settings: dict = {}
    for part in lever.split("+"):
        if part not in LEVERS:
            raise ValueError(f"unknown lever {part!r}: give {BASELINE}, one of {', '.join(LEVERS)}, or levers "
                             "joined by '+' (coarse+code)")
        settings.update(LEVERS[part])
    return world.WorldOptions(**settings)


def build_command(options: world.WorldOptions, out: Path, args: argparse.Namespace) -> list[str]:
    """The build of one pilot: build 5 continued with the shared recipe and the lever's options."""
    steps = ["--unet-steps", str(args.unet_steps)] if args.unet_steps else []
    return [sys.executable, "-m", "studio.demo.build", "--out", str(out), "--minutes", str(args.minutes), *steps,
            "--threads", str(args.threads), "--seed", str(args.build_seed), "--images", str(args.images),
            *BUILD_RECIPE, "--looks", options.looks, "--look-words", str(options.look_words),
            "--look-code", str(options.look_code)]


def encoder_check(options: world.WorldOptions, identity) -> float:
    """The identity encoder's same-colour ROC AUC on 100 held-out individuals of the lever's looks (clean views;
    `python -m studio.demo.identity --measure --looks ...` in small)."""
    return measure(identity, n_individuals=100, looks=options.looks)["held_out_individuals"]["clean"]["auc_same_color"]


def code_reach(model, sets: dict, identity, code: LookCode, cfg: EvalConfig) -> dict:
    """Identity of "a photo of a <code>" with each held-out individual's exact look code against "a photo of a
    <best plain words>" (same seeds), per subject, with a bootstrap interval over subjects."""
    margins, with_code, plain = [], [], []
    for k, cs in enumerate(sets.values()):
        references = [Image.open(p).convert("RGB") for p in cs.images]
        concept = Concept("<look>", {"text_encoder": code.codes([cs.individual])})
        seed = cfg.seed + 100 * k
        a = identity.similarity(generate_pictures(model, "a photo of a <look>", [concept], cfg.images, seed, cfg),
                                references)
        b = identity.similarity(generate_pictures(model, f"a photo of a {cs.plain_subject}", [], cfg.images, seed,
                                                  cfg), references)
        with_code.append(float(np.mean(a)))
        plain.append(float(np.mean(b)))
        margins.append(with_code[-1] - plain[-1])
    return {"code": float(np.mean(with_code)), "plain": float(np.mean(plain)),
            "margin": bootstrap_mean(margins, cfg.resamples, cfg.seed).as_dict()}


def interval(d: dict) -> str:
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lever", help=f"{BASELINE}, one of {', '.join(LEVERS)}, or levers joined by '+'")
    parser.add_argument("--minutes", type=float, default=25.0, help="the build's wall-clock budget (the same for all)")
    parser.add_argument("--unet-steps", type=int, default=None,
                        help="a fixed number of UNet steps instead of the minutes (pairs exactly on a busy machine)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the build and the scoring")
    parser.add_argument("--images", type=int, default=24000, help="training pictures (the build's --images)")
    parser.add_argument("--build-seed", type=int, default=41, help="the build's --seed: the same pictures for all")
    parser.add_argument("--held-out", type=int, default=12, help="held-out individuals scored")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="which individuals, and the sampling seeds")
    parser.add_argument("--prompts", type=int, default=80, help="compliance captions")
    parser.add_argument("--compliance-seed", type=int, default=COMPLIANCE_SEED)
    parser.add_argument("--root", type=Path, default=Path("/tmp"), help="pilots go to <root>/pilot-<lever>/")
    parser.add_argument("--skip-build", action="store_true", help="score the model an earlier run built")
    parser.add_argument("--quick", action="store_true", help="score in miniature (studio eval --quick): smoke tests")
    args = parser.parse_args()
    try:
        options = lever_options(args.lever)
    except ValueError as exc:
        parser.error(str(exc))
    run = args.root / f"pilot-{args.lever}"
    model_dir = run / "demo-model"
    run.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # as `studio eval`: one safety-checker notice per picture buries the row
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    # 1. Build.
    if not args.skip_build:
        with open(run / "build.log", "w") as log:
            subprocess.run(build_command(options, model_dir, args), cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT, check=True)
    built = json.loads((model_dir / "training_log.json").read_text())
    build_minutes = built["seconds"] / 60

    # 2. Held-out Textual Inversion in the model's own world; 3. compliance on world v2's captions.
    t1 = time.time()
    shutil.rmtree(run / "eval-work", ignore_errors=True)  # a rerun trains and writes its sets afresh
    judge, demo_world = DemoJudge(), DemoWorld.for_model(model_dir)
    identity_cfg = EvalConfig(held_out=args.held_out, seed=args.seed, skip_compliance=True)
    compliance_cfg = EvalConfig(prompts=args.prompts, seed=args.compliance_seed, skip_concepts=True)
    if args.quick:
        identity_cfg, compliance_cfg = identity_cfg.quick(), compliance_cfg.quick()
    held = run_evaluation(str(model_dir), judge, demo_world, identity_cfg, run / "eval-work", progress=print)
    write_json(held, run / "identity.json")
    comp = run_evaluation(str(model_dir), judge, demo_world, compliance_cfg, progress=print)
    write_json(comp, run / "compliance.json")

    # 4. The code's reach, and the encoder's check on these looks.
    identity = demo_world.identity()
    sets = {p.name: load_concept_set(p) for p in sorted((run / "eval-work" / "held-out").iterdir())
            if (p / "concept.json").is_file()}
    reach = None
    if "look_code" in built:
        model = ModelManager().load(str(model_dir))
        reach = code_reach(model, sets, identity, LookCode.from_json(built["look_code"]), identity_cfg)
    ruler = encoder_check(options, identity)
    score_minutes = (time.time() - t1) / 60

    # 5. The row.
    pooled = held["pooled"]["held_out"]
    compliance = comp["compliance"]
    row = {"lever": args.lever, "options": asdict(options), "unet_steps": built.get("unet_steps"),
           "build_minutes": round(build_minutes, 1), "score_minutes": round(score_minutes, 1),
           "ti_identity": pooled["textual_inversion"]["identity"], "plain_identity": pooled["plain_prompt"]["identity"],
           "margin": pooled["margins"]["identity"], "share_of_ceiling": pooled["identity_of_ceiling"],
           "code_reach": reach, "compliance_mean": compliance["mean_ci"],
           "position": compliance["per_attribute"].get("position"), "color": compliance["per_attribute"].get("color"),
           "encoder_auc_same_color": ruler, "held_out": args.held_out, "seed": args.seed,
           "compliance_seed": args.compliance_seed, "prompts": args.prompts, "minutes": args.minutes,
           "threads": args.threads, "quick": args.quick}
    (run / "row.json").write_text(json.dumps(row, indent=1) + "\n")
    header = ("| lever | UNet steps | TI identity | plain words | margin [95%] | share of ceiling | code reach "
              "(margin) | compliance mean | position | colour | encoder AUC | build + scoring min |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")
    line = (f"| {args.lever} | {row['unet_steps']} | {row['ti_identity']['mean']:.2f} | "
            f"{row['plain_identity']['mean']:.2f} | {interval(row['margin'])} (n={row['margin']['n']}) | "
            f"{row['share_of_ceiling']['mean']:.2f} | "
            f"{interval(reach['margin']) if reach else '-'} | {compliance['mean']:.2f} "
            f"[{compliance['mean_ci']['low']:.2f}, {compliance['mean_ci']['high']:.2f}] | "
            f"{row['position'] if row['position'] is not None else '-'} | {row['color']} | {ruler:.3f} | "
            f"{build_minutes:.0f} + {score_minutes:.0f} |")
    table = args.root / "pilot-table.md"
    if not table.exists():
        table.write_text(header + "\n")
    with open(table, "a") as f:
        f.write(line + "\n")
    print(header)
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Memory modes: seconds and peak memory of one generation in each of `fast`, `balanced` and `low-vram`.

`python benchmarks/memory_modes.py [--size tiny|full] [--steps N] [--device cpu|cuda]`

A random-weight pipeline (`architectures.build_random_pipeline("sd1", size)`: `full` has SD 1.5's shapes and
makes 512x512 pictures, `tiny` is the test model at 64x64) is saved once; then each mode runs in its own process
(so that memory freed by one cannot be reused by the next): `ModelManager(apply_preset(mode)).load(folder)`, one
1-step warm-up, then `--repeats` timed `generate` calls of one picture at `--steps` steps with previews off (the
fastest time and the highest memory peak are shown).

Memory is the peak during the timed generation, weights included (offload's whole point is to keep them off the
GPU), measured as in `train_speed.py`: CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS (VmHWM
after resetting it through /proc/self/clear_refs, or psutil sampling every 5 ms where that cannot be reset). Also
shown: the peak above the level just before generating. Prints each mode and its ratios to `fast`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from train_speed import peak_memory  # the training benchmark's measurement: peak above the level at entry

MODES = ("fast", "balanced", "low-vram")
SIDE = {"tiny": 64, "full": 512}  # picture side per model size


def current_mib(device: torch.device) -> float:
    """Memory in use now: allocated CUDA memory, or the process RSS."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_mode(mode: str, model_dir: Path, size: str, steps: int, device: str | None, repeats: int) -> dict:
    """Load `model_dir` in memory mode `mode` and time one generation `repeats` times; the fastest run and the
    highest peak are returned as a dict."""
    from studio.engine.generate import GenerateRequest, generate
    from studio.engine.memory import apply_preset, memory_settings
    from studio.engine.models import LoadOptions, ModelManager

    model = ModelManager(apply_preset(mode, LoadOptions(device=device))).load(model_dir)
    side = SIDE[size]
    request = dict(prompt="a red cat on a blue sofa", seed=0, width=side, height=side, preview_every=0)
    generate(model, GenerateRequest(steps=1, **request))  # warm-up: first-call allocations and kernel choices
    runs = []
    for _ in range(repeats):
        entry = current_mib(model.device)
        with peak_memory(model.device) as memory:
            start = time.perf_counter()
            generate(model, GenerateRequest(steps=steps, **request))
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        runs.append({"seconds": seconds, "peak_mib": entry + memory["peak_mib"],
                     "above_entry_mib": memory["peak_mib"], "how": memory["how"]})
    peak = max(runs, key=lambda r: r["peak_mib"])
    return {"mode": mode, "seconds": min(r["seconds"] for r in runs), "peak_mib": peak["peak_mib"],
            "above_entry_mib": max(r["above_entry_mib"] for r in runs), "how": peak["how"],
            "device": model.device.type, "dtype": str(model.dtype), "settings": memory_settings(model.pipe)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="full",
                        help="full: SD-1.5-sized random weights, 512x512 (for a GPU); tiny: the test model, 64x64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode: fastest time, highest peak")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when there is one)")
    parser.add_argument("--only", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.only:  # one mode, in its own process
        print(json.dumps(run_mode(args.only, args.model_dir, args.size, args.steps, args.device, args.repeats)))
        return

    from architectures import build_random_pipeline
    from studio.engine.memory import pick_auto

    root = Path(tempfile.mkdtemp(prefix="memory-modes-"))
    build_random_pipeline("sd1", args.size, tokenizer_dir=root / "tokenizer").save_pretrained(root / "model")
    results = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--only", mode, "--model-dir", str(root / "model"), "--size", args.size,
               "--steps", str(args.steps), "--repeats", str(args.repeats)] + (["--device", args.device] if args.device else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            sys.exit(f"memory mode {mode} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    first = results[0]
    print(f"size={args.size} ({SIDE[args.size]}x{SIDE[args.size]}) steps={args.steps} repeats={args.repeats} device={first['device']} "
          f"dtype={first['dtype']} threads={torch.get_num_threads()} auto would pick: {pick_auto().name}")
    print(f"memory: {first['how']}")
    print(f"{'mode':10}{'seconds':>9}{'peak MiB':>10}{'above entry':>13}{'time/fast':>11}{'peak/fast':>11}  in effect")
    for r in results:
        on = ", ".join(k for k, v in r["settings"].items() if v) or "nothing"
        print(f"{r['mode']:10}{r['seconds']:9.2f}{r['peak_mib']:10.1f}{r['above_entry_mib']:13.1f}"
              f"{r['seconds'] / first['seconds']:10.2f}x{r['peak_mib'] / first['peak_mib']:10.2f}x  {on}")


if __name__ == "__main__":
    main()

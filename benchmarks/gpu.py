"""GPU memory and speed of each memory mode, for training and generation, against bare diffusers in the same run.

`python benchmarks/gpu.py [--size full|tiny] [--device cuda|cpu] [--families sd1,sdxl] [--json PATH]`

Issue 6's benchmark. Random-weight pipelines built from configs (`architectures.build_random_pipeline`:
`full` has SD 1.5's and SDXL's real shapes; `tiny` is the test model, for the CPU path), saved once. Then, for each
family and each memory mode (fast, balanced, low-vram):
- (a) Textual Inversion steps through the studio `Trainer` (as `studio train --memory MODE` runs them: fp16
  weights with autocast on CUDA, fp32 on CPU) at 512 px (SDXL: 1024 px; tiny: the model's 32 px), batch 1 and 4;
- (b) one 512x512 picture at 25 steps through `studio.engine.generate` with the mode's preset
  (`memory_modes.run_mode`: the generation benchmark's own measurement, reused);
and the references in the same run:
- a bare diffusers pipeline call with SDPA attention (same dtype, scheduler Euler a, guidance 7.5, size, steps);
- the diffusers-style TI loop of `train_speed.py` (`run_diffusers_style`, reused unchanged: SD 1.x only, fp32, no
  memory savings, a VAE encode every step), against which the studio trainer runs once more in the same settings
  (mode `fast`, fp32 weights, no autocast) for a like-for-like overhead ratio.

Each measurement runs in its own process (forked from a server that has imported torch and diffusers once, so
that the CPU path fits in two minutes; CUDA is first touched in the measuring process) so that peaks do not mix.

Speed: generation it/s = steps / seconds of the whole call (prompt encoding and VAE decode included), after a 1-step
warm-up, fastest of `--repeats`; TI step = median time between consecutive UNet calls (one per step in both loops;
checkpointing recomputes inner blocks, not the top-level call), after `--warmup` steps, the GPU synchronized at
each stamp. Memory: the peak of the measured part with the weights included (offload's point is to keep them off the
GPU): CUDA torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats once the model is loaded; CPU the
process's peak RSS (reset through /proc/self/clear_refs once loaded), as in `train_speed.py`.
Prints a table with the ratios and the issue's targets; `--json` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

from memory_modes import SIDE, current_mib, run_mode  # generation: side per size; the studio's measurement
from train_speed import INIT_WORD, LEARNING_RATE, TOKEN, _rss_kib, peak_memory, prepare, run_diffusers_style

MODES = ("fast", "balanced", "low-vram")
TRAIN_SIDE = {"full": {"sd1": 512, "sdxl": 1024}, "tiny": {"sd1": None, "sdxl": None}}  # None: the model's native
PROMPT = "a red cat on a blue sofa"
GIB = 1024  # MiB
# Issue 6's targets: (family, what, mode, batch) -> most MiB. GB read as GiB, as GPU cards are sold.
PEAK_TARGETS = {("sd1", "train", "low-vram", 1): 4 * GIB, ("sd1", "train", "fast", 1): 8 * GIB,
                ("sd1", "generate", "low-vram", None): 3 * GIB, ("sdxl", "train", "low-vram", 1): 12 * GIB}
GEN_SPEED_TARGET = 1.0  # studio fast it/s over bare diffusers with SDPA, at least
TRAIN_OVERHEAD_TARGET = 0.05  # studio TI step over the bare loop in the same settings, at most


# ---- measuring, in the measured process ---------------------------------------------------------------------
def device_of(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def absolute_peak_mib(device: torch.device) -> float:
    """The peak since the last reset (train_speed.peak_memory resets it), weights included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_kib("VmHWM") / 1024


@contextmanager
def unet_clock(device: torch.device):
    """Yield a list that gets a time stamp at every call of the block's UNet (the first UNet called; a global
    forward pre-hook finds it, then hands over to a hook on that UNet alone so no other module pays for timing)."""
    from diffusers import UNet2DConditionModel

    stamps: list[float] = []
    found: list = []

    def stamp(module, args) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()  # the previous step's kernels are done
        stamps.append(time.perf_counter())

    def find_unet(module, args) -> None:
        if isinstance(module, UNet2DConditionModel) and not found:
            finder.remove()  # this call's hooks are already collected: it is stamped here, later calls by the UNet's
            found.append(module.register_forward_pre_hook(stamp))
            stamp(module, args)

    finder = torch.nn.modules.module.register_module_forward_pre_hook(find_unet)
    try:
        yield stamps
    finally:
        finder.remove()
        for handle in found:
            handle.remove()


def seconds_per_step(stamps: list[float], warmup: int) -> float:
    """Median step time from UNet call stamps, the first `warmup` steps left out."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    if not steps:
        raise RuntimeError(f"only {len(stamps)} UNet calls were timed: ask for more --train-steps")
    return statistics.median(steps)


def bare_generation(job: dict) -> dict:
    """One picture through a plain diffusers pipeline with SDPA attention, in the dtype the studio loads on the
    device (fp16 on CUDA), the studio's default scheduler and guidance."""
    from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    device = device_of(job["device"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(job["model_dir"], torch_dtype=dtype).to(device)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    side = SIDE[job["size"]]
    call = dict(prompt=PROMPT, guidance_scale=7.5, width=side, height=side)
    pipe(**call, num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(0))  # warm-up
    runs = []
    for _ in range(job["repeats"]):
        entry = current_mib(device)
        with peak_memory(device) as memory:
            start = time.perf_counter()
            pipe(**call, num_inference_steps=job["steps"], generator=torch.Generator("cpu").manual_seed(0))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        runs.append((seconds, entry + memory["peak_mib"]))
    return {"seconds": min(r[0] for r in runs), "peak_mib": max(r[1] for r in runs), "dtype": str(dtype),
            "settings": "SDPA (AttnProcessor2_0), everything on the device"}


def studio_generation(job: dict) -> dict:
    """`memory_modes.run_mode`: the studio's `generate` on a model loaded with the mode's preset."""
    return run_mode(job["mode"], Path(job["model_dir"]), job["size"], job["steps"], job["device"], job["repeats"])


def studio_training(job: dict) -> dict:
    """TI steps through the studio Trainer, loaded and configured as `studio train --memory MODE` does."""
    from studio.engine.models import LoadOptions, ModelManager
    from studio.training import TrainConfig, Trainer

    fp32 = job.get("precision") == "fp32"
    model = ModelManager(LoadOptions(device=job["device"], dtype="fp32" if fp32 else None)).load(job["model_dir"])
    cfg = TrainConfig(TOKEN, init_text=INIT_WORD, steps=job["warmup"] + job["train_steps"] + 1,
                      batch_size=job["batch"], learning_rate=LEARNING_RATE, resolution=job["resolution"], seed=0,
                      memory=job["mode"], mixed_precision="no" if fp32 else "auto")
    events = []
    with unet_clock(model.device) as stamps, peak_memory(model.device):
        Trainer(model, cfg, job["images"], tempfile.mkdtemp(prefix="gpu-bench-ti-")).run(events.append)
        peak = absolute_peak_mib(model.device)
    started = next(e.message for e in events if e.kind == "started")
    return {"seconds_per_step": seconds_per_step(stamps, job["warmup"]), "peak_mib": peak, "dtype": str(model.dtype),
            "settings": started.split("memory mode ", 1)[-1]}


def bare_training(job: dict) -> dict:
    """`train_speed.run_diffusers_style`, unchanged: the diffusers textual_inversion example's loop."""
    device = device_of(job["device"])
    args = SimpleNamespace(steps=job["warmup"] + job["train_steps"] + 1, batch=job["batch"], seed=0,
                           device=job["device"])
    with unet_clock(device) as stamps:
        run_diffusers_style(Path(job["model_dir"]), Path(job["images"]), args)  # resets the peak once loaded
        peak = absolute_peak_mib(device)
    return {"seconds_per_step": seconds_per_step(stamps, job["warmup"]), "peak_mib": peak, "dtype": "torch.float32",
            "settings": "whole embedding table trainable, VAE encode every step, no savings"}


MEASURE = {"bare-generate": bare_generation, "studio-generate": studio_generation,
           "studio-train": studio_training, "bare-train": bare_training}


def measure(job: dict) -> dict:
    """Run one job in this (fresh) process; an error, out of memory included, is a result too."""
    device = device_of(job["device"])
    try:
        result = MEASURE[job["kind"]](job)
    except Exception as exc:  # noqa: BLE001 - reported in the table (e.g. `fast` out of memory on a small GPU)
        result = {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {**{k: v for k, v in job.items() if k not in ("model_dir", "images")}, **result, "gpu": gpu,
            "device": device.type}


# ---- driver -----------------------------------------------------------------------------------------------------
def jobs_for(args, dirs: dict[str, Path], images: Path) -> list[dict]:
    """Every measurement of the run, references first in each group."""
    common = dict(size=args.size, device=args.device)
    jobs = []
    for family in args.families:
        gen = dict(common, family=family, model_dir=str(dirs[family]), steps=args.steps, repeats=args.repeats)
        jobs.append(dict(gen, kind="bare-generate", mode="bare", batch=1))
        jobs += [dict(gen, kind="studio-generate", mode=mode, batch=1) for mode in MODES]
        train = dict(common, family=family, model_dir=str(dirs[family]), images=str(images), warmup=args.warmup,
                     train_steps=args.train_steps, resolution=TRAIN_SIDE[args.size][family])
        for batch in args.batches:
            if family == "sd1":  # the reused reference loop is SD 1.x only
                jobs.append(dict(train, kind="bare-train", mode="bare", batch=batch))
                jobs.append(dict(train, kind="studio-train", mode="fast", batch=batch, precision="fp32"))
            jobs += [dict(train, kind="studio-train", mode=mode, batch=batch) for mode in MODES]
    return jobs


def run_all(jobs: list[dict]) -> list[dict]:
    """Each job in a process of its own, one at a time, forked from a server that imported the heavy modules."""
    # Python 3.11's forkserver does not take the parent's sys.path (it silently skips preloads it cannot import,
    # and every child then pays ~4 s of imports on this machine): give it through the environment.
    here = Path(__file__).resolve().parent
    os.environ["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "memory_modes", "train_speed", "architectures",
                                    "studio.engine.models", "studio.engine.generate", "studio.training"])
    results = []
    for job in jobs:
        started = time.perf_counter()
        try:  # a pool per job: a process that dies (killed for memory) ends its own job only
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                results.append(pool.submit(measure, job).result())
        except BrokenProcessPool as exc:
            results.append({**{k: v for k, v in job.items() if k not in ("model_dir", "images")}, "gpu": None,
                            "device": job["device"] or "?", "error": f"the measuring process died: {exc}"})
        print(f"  {job['family']} {job['kind']} {job['mode']} batch {job['batch']}: "
              f"{time.perf_counter() - started:.1f}s", flush=True)
    return results


def _find(results: list[dict], **match) -> dict | None:
    return next((r for r in results if all(r.get(k) == v for k, v in match.items()) and "error" not in r), None)


def checks(results: list[dict], on_gpu: bool) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met (None: not measured here)."""
    out = []
    for (family, what, mode, batch), limit in PEAK_TARGETS.items():
        kind = f"studio-{what}"
        r = _find(results, family=family, kind=kind, mode=mode, precision=None, **({"batch": batch} if batch else {}))
        if r is not None:
            out.append({"target": f"{family} {what} {mode}{f' batch {batch}' if batch else ''} peak <= "
                                  f"{limit / GIB:g} GiB", "value": f"{r['peak_mib'] / GIB:.2f} GiB",
                        "met": r["peak_mib"] <= limit if on_gpu else None})
    for family in ("sd1", "sdxl"):
        bare, fast = _find(results, family=family, kind="bare-generate"), _find(results, family=family,
                                                                                 kind="studio-generate", mode="fast")
        if bare and fast:
            ratio = bare["seconds"] / fast["seconds"]
            out.append({"target": f"{family} generate fast it/s >= {GEN_SPEED_TARGET:g}x bare SDPA",
                        "value": f"{ratio:.2f}x", "met": ratio >= GEN_SPEED_TARGET if on_gpu else None})
        for batch in sorted({r["batch"] for r in results if r["kind"] == "bare-train"}):
            bare = _find(results, family=family, kind="bare-train", batch=batch)
            same = _find(results, family=family, kind="studio-train", batch=batch, precision="fp32")
            if bare and same:
                over = same["seconds_per_step"] / bare["seconds_per_step"] - 1
                out.append({"target": f"{family} TI step batch {batch} overhead <= {TRAIN_OVERHEAD_TARGET:.0%} over "
                                      "the bare loop (fast, fp32)", "value": f"{over:+.1%}",
                            "met": over <= TRAIN_OVERHEAD_TARGET if on_gpu else None})
    return out


def print_report(args, results: list[dict], met: list[dict], gpu: str | None) -> None:
    where = gpu or f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{where}; size={args.size}; generation {SIDE[args.size]}x{SIDE[args.size]} px, {args.steps} steps, "
          f"fastest of {args.repeats}; TI median of {args.train_steps} steps after {args.warmup}; "
          f"peaks include the weights")
    print(f"\n{'family':7}{'generation':22}{'it/s':>8}{'peak MiB':>10}{'/bare it/s':>11}  settings")
    for r in (r for r in results if r["kind"].endswith("generate")):
        name = "bare diffusers SDPA" if r["kind"] == "bare-generate" else f"studio {r['mode']}"
        if "error" in r:
            print(f"{r['family']:7}{name:22}  {r['error']}")
            continue
        bare = _find(results, family=r["family"], kind="bare-generate")
        ratio = f"{bare['seconds'] / r['seconds']:10.2f}x" if bare else f"{'-':>11}"
        settings = r["settings"] if isinstance(r["settings"], str) else \
            ", ".join(k for k, v in r["settings"].items() if v) or "nothing"
        print(f"{r['family']:7}{name:22}{r['steps'] / r['seconds']:8.2f}{r['peak_mib']:10.1f}{ratio}  {settings}")
    print(f"\n{'family':7}{'batch':>5}  {'TI step':28}{'s/step':>9}{'peak MiB':>10}{'/bare':>8}  settings")
    for r in (r for r in results if r["kind"].endswith("train")):
        name = ("diffusers-style loop (fp32)" if r["kind"] == "bare-train"
                else f"studio {r['mode']}{' (fp32)' if r.get('precision') == 'fp32' else ''}")
        if "error" in r:
            print(f"{r['family']:7}{r['batch']:5}  {name:28}  {r['error']}")
            continue
        bare = _find(results, family=r["family"], kind="bare-train", batch=r["batch"])
        ratio = f"{r['seconds_per_step'] / bare['seconds_per_step']:7.2f}x" if bare else f"{'-':>8}"
        print(f"{r['family']:7}{r['batch']:5}  {name:28}{r['seconds_per_step']:9.3f}{r['peak_mib']:10.1f}{ratio}  "
              f"{r['settings']}")
    print("\ntargets" + ("" if gpu else " (GPU targets: not judged on a CPU run)"))
    for c in met:
        verdict = {True: "met", False: "NOT met", None: "-"}[c["met"]]
        print(f"  {c['target']:64} {c['value']:>10}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="full: SD 1.5 / SDXL shapes, 512 px (SDXL training 1024 px), for a GPU; tiny: the test "
                        "model, for the CPU path")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when there is one)")
    parser.add_argument("--families", default="sd1,sdxl", help="comma-separated: sd1, sdxl")
    parser.add_argument("--steps", type=int, default=25, help="generation steps")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed generations per job, the fastest shown (default: 3 full, 1 tiny)")
    parser.add_argument("--batches", default="1,4", help="TI batch sizes")
    parser.add_argument("--train-steps", type=int, default=None, help="timed TI steps (default: 10 full, 3 tiny)")
    parser.add_argument("--warmup", type=int, default=2, help="TI steps left out of the timing")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not set(args.families) <= {"sd1", "sdxl"}:
        parser.error(f"--families takes sd1 and/or sdxl, not {','.join(args.families)}")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.train_steps = args.train_steps or (10 if args.size == "full" else 3)
    args.repeats = args.repeats or (3 if args.size == "full" else 1)

    # 1. Models and pictures (train_speed's: seeded squares on noise, at SD 1.x's side), saved once.
    from architectures import build_random_pipeline

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    dirs = {}
    sd1_dir, images = prepare(root, args.size, 5)
    dirs["sd1"] = sd1_dir
    if "sdxl" in args.families:
        build_random_pipeline("sdxl", args.size, tokenizer_dir=root / "tok-sdxl").save_pretrained(root / "sdxl")
        dirs["sdxl"] = root / "sdxl"
    print(f"models and pictures in {root} ({time.perf_counter() - started:.0f}s)", flush=True)

    # 2. Every measurement in its own process.
    jobs = jobs_for(args, dirs, images)
    results = run_all(jobs)

    # 3. Report.
    gpu = next((r["gpu"] for r in results if r.get("gpu")), None)
    met = checks(results, on_gpu=gpu is not None)
    print_report(args, results, met, gpu)
    print(f"\nwhole run: {time.perf_counter() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v if not isinstance(v, Path) else str(v)
                                                  for k, v in vars(args).items()},
                                         "gpu": gpu, "results": results, "targets": met}, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()

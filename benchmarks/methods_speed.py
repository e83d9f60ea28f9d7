"""Weight-tuning methods against diffusers' own training scripts: per-step time and peak memory (issue 17, item 4).

`python benchmarks/methods_speed.py [--methods lora,pivotal] [--steps 30] [--batch 2] [--repeats 2] [--json FILE]`

Each method is measured against the diffusers example script that does the same thing:
- `lora`: `examples/dreambooth/train_dreambooth_lora.py` (DreamBooth-LoRA, "a photo of sks toy") against
  `studio train --method lora`;
- `pivotal`: `examples/advanced_diffusion_training/train_dreambooth_lora_sd15_advanced.py` with
  `--train_text_encoder_ti` (pivotal tuning: new word vectors for a token abstraction plus a UNet LoRA) against
  `studio train --method pivotal`.
The scripts are diffusers' own, read at run time from `--ref-dir` (never copied into this repository); with
`--diffusers-git DIR` the benchmark extracts them there from a diffusers git clone or mirror at `DIFFUSERS_COMMIT`.
They import torchvision (for `transforms` only), which the studio does not need: the benchmark looks for it in
`<ref-dir>/site` (kept out of the studio's environment) and says how to install it there when it is missing.

Both sides train the demo model (assets/demo-model, 64 px) on the pictures of assets/concepts/toy-ladybug, on the
CPU, fp32, one thread, no prior preservation, with the same steps, batch size, LoRA rank, learning rates, vectors
per word and seed. Each run is its own process, the sides interleaved (reference, studio, reference, studio, ...)
so that a burst of load from another job hits both alike; each figure shown is the best of its runs.

Per step: both sides show a tqdm bar that advances once per optimisation step; this process timestamps each bar
update as it arrives through the pipe and takes the steady-state window from step `--warmup` to the last step:
(t[last] - t[warmup]) / (last - warmup), in wall time and in the child's own CPU time (/proc schedstat), which
other jobs on the shared cores do not inflate. Model loading, the studio's latent cache, the first steps
(allocator and kernel warm-up) and the reference's final save and pipeline reload all lie outside that window.
Peak memory: the peak RSS of the whole run above the child process's level once Python, torch, numpy and PIL are
imported, measured by `train_speed.peak_memory` (VmHWM after /proc/self/clear_refs) around the script or CLI; so
it includes the libraries each side imports and the model, which both load, and whatever else each holds at its
peak.

A third process per method measures its floor (`train_floor`): the UNet's forward and backward through the LoRA
and AdamW over it, on latents made once (for pivotal also the word's pass through the text encoder), the work no
trainer of the method can drop; `reference / floor` is the most any trainer could gain over the script here.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "assets" / "demo-model"
CONCEPT = REPO / "assets" / "concepts" / "toy-ladybug"
# The newest commit of diffusers' main branch in the mirror fetched on 2026-12-01 (setup.py: 0.40.0.dev0); both
# scripts at it require diffusers >= 0.40.0.dev0 (`check_min_version`), which the installed 0.42.1 passes.
DIFFUSERS_COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"
REF_SCRIPTS = {  # method -> the diffusers example script that trains the same thing
    "lora": "examples/dreambooth/train_dreambooth_lora.py",
    "pivotal": "examples/advanced_diffusion_training/train_dreambooth_lora_sd15_advanced.py",
}
DEFAULT_REF_DIR = Path(tempfile.gettempdir()) / "diffusers-ref"
# "sks" is DreamBooth's rare-token identifier; "toy" the class word of the toy-ladybug set.
LORA_TOKEN, CLASS_WORD, PIVOTAL_TOKEN, TOKEN_ABSTRACTION = "sks", "toy", "<sks>", "TOK"
RESULT_FLAG = "--child-result"
_DECLARED: list = []  # torchvision op schemas declared in a reference process (declare_torchvision_ops_if_missing)


# ---- the reference scripts ------------------------------------------------------------------------------------
def reference_script(ref_dir: Path, method: str) -> Path:
    return ref_dir / Path(REF_SCRIPTS[method]).name


def extract_references(git_dir: Path, ref_dir: Path) -> None:
    """Write both scripts at `DIFFUSERS_COMMIT` from a diffusers git repository (a clone or a bare mirror)."""
    ref_dir.mkdir(parents=True, exist_ok=True)
    for method, path in REF_SCRIPTS.items():
        done = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{DIFFUSERS_COMMIT}:{path}"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"cannot read {path} at {DIFFUSERS_COMMIT[:10]} from {git_dir}: {done.stderr.strip()}; "
                     "give --diffusers-git the .git folder of a diffusers clone that has that commit")
        reference_script(ref_dir, method).write_text(done.stdout)


def check_references(ref_dir: Path, methods: list[str]) -> None:
    """Exit with a one-line error unless each method's script is in `ref_dir` and accepts the installed diffusers."""
    from packaging.version import Version

    installed = Version(metadata.version("diffusers"))
    for method in methods:
        script = reference_script(ref_dir, method)
        if not script.is_file():
            sys.exit(f"diffusers' reference script {script.name} is not in {ref_dir}: run this benchmark once with "
                     f"--diffusers-git PATH/TO/diffusers/.git (it extracts {REF_SCRIPTS[method]} at "
                     f"{DIFFUSERS_COMMIT[:10]}), or give --ref-dir the folder that holds it")
        wanted = re.search(r'^check_min_version\("([^"]+)"\)', script.read_text(), re.M)
        if wanted and installed < Version(wanted.group(1)):
            sys.exit(f"{script.name} needs diffusers >= {wanted.group(1)} but {installed} is installed: extract the "
                     f"scripts of an older diffusers commit")


def torchvision_path(ref_dir: Path) -> Path | None:
    """Where the reference processes find torchvision: `<ref-dir>/site` (kept apart from the studio's
    environment) or the environment itself; None when neither has it."""
    import importlib.util

    if (ref_dir / "site" / "torchvision").is_dir():
        return ref_dir / "site"
    spec = importlib.util.find_spec("torchvision")
    return Path(spec.origin).parents[1] if spec and spec.origin else None


def torchvision_install_hint(ref_dir: Path) -> str:
    torch_minor = int(metadata.version("torch").split(".")[1])  # torchvision 0.N pairs with torch 2.(N - 15)
    return f"pip install --no-deps --target {ref_dir / 'site'} torchvision==0.{torch_minor + 15}.0"


def declare_torchvision_ops_if_missing() -> None:
    """Let torchvision import where its compiled ops cannot load. The registry's Linux wheels are built against
    CUDA torch; on a CPU-only torch their `_C.so` does not load, and `import torchvision` then fails while
    registering fake kernels for two ops it assumes exist (`operator torchvision::nms does not exist`). The reference
    scripts use only `torchvision.transforms` (pure Python), so declaring those two schemas is enough; where the
    compiled ops load, nothing is declared."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    compiled = Path(spec.submodule_search_locations[0]) / "_C.so"
    try:
        torch.ops.load_library(str(compiled))
        return
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _DECLARED.append(library)  # a Library's definitions last as long as the object


# ---- one side, in its own process -----------------------------------------------------------------------------
def train_floor(argv: list[str]) -> None:
    """What every DreamBooth-LoRA loop must do, and nothing else: the UNet's forward and backward through a LoRA
    on the same targets as diffusers' script (rank r, alpha r, gaussian init) and AdamW over it, on latents and
    a prompt embedding made once. With `--word` (pivotal) the prompt is encoded every step instead, and the
    backward goes on through the text encoder into its token table (AdamW over that small table: 735 x 128 on the
    demo model), the pass a learning word needs. No trainer of the method can step faster on this model, so
    `reference / floor` is the most any could gain over the script."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from PIL import Image
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="floor")
    for name, kind in (("--images", Path), ("--steps", int), ("--batch", int), ("--rank", int), ("--unet-lr", float),
                       ("--seed", int)):
        parser.add_argument(name, type=kind, required=True)
    parser.add_argument("--word", action="store_true")
    parser.add_argument("--model", type=Path, default=MODEL)
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, safety_checker=None)
    for module in (pipe.text_encoder, pipe.vae, pipe.unet):
        module.requires_grad_(False)
    torch.manual_seed(args.seed)
    pipe.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    weights = [p for p in pipe.unet.parameters() if p.requires_grad]
    if args.word:
        weights.append(pipe.text_encoder.get_input_embeddings().weight.requires_grad_(True))
    optimizer = torch.optim.AdamW(weights, lr=args.unet_lr)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    files = sorted(args.images.glob("*.png"))[: args.batch]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for f in files])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([f"a photo of {LORA_TOKEN} {CLASS_WORD}"] * len(files), padding="max_length",
                             truncation=True, max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
    pipe.unet.train()
    for _ in tqdm(range(args.steps), desc="floor"):
        if args.word:
            hidden = pipe.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(files),))
        pred = pipe.unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        optimizer.step()
        optimizer.zero_grad()


def child(kind: str, argv: list[str], result_file: Path) -> int:
    """Run a reference script (`kind == "reference"`: argv[0] is its path), `python -m studio` (argv: what
    follows `-m studio`) or `train_floor` in this process, one thread, inside `train_speed.peak_memory`; write
    the peak to `result_file`."""
    import runpy

    import torch
    from train_speed import _rss_kib, peak_memory

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    if kind == "reference":
        from accelerate.tracking import get_available_trackers

        # The scripts get `--report_to all` (accelerate has no "none"); with a tracker installed they would also
        # log to it every step, which is not the work being compared.
        if get_available_trackers():
            sys.exit(f"accelerate would log the reference to {get_available_trackers()}: run where none is installed")
        declare_torchvision_ops_if_missing()
    sys.argv = argv if kind == "reference" else ["studio", *argv]
    code = 0
    with peak_memory(torch.device("cpu")) as memory:
        try:
            if kind == "reference":
                runpy.run_path(argv[0], run_name="__main__")
            elif kind == "studio":
                runpy.run_module("studio", run_name="__main__", alter_sys=True)
            else:
                train_floor(argv)
        except SystemExit as stop:  # studio's __main__ exits with main()'s code; keep measuring to the end
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    # VmHWM now: the absolute peak since peak_memory reset it, to set against the RSS once training ran.
    result_file.write_text(json.dumps({"exit_code": code, "peak_rss_mib": _rss_kib("VmHWM") / 1024, **memory}))
    return code


# ---- the command lines ----------------------------------------------------------------------------------------
def commands(method: str, args, pictures: Path, ref_dir: Path) -> dict[str, list[str]]:
    """The two command lines of one method, after `python` (each run in its own folder, where both write `out/`):
    the reference script with its arguments, and `-m studio train ...` (plus any `--studio-arg`)."""
    common_ref = ["--pretrained_model_name_or_path", str(args.model), "--instance_data_dir", str(pictures),
                  # a relative output folder: the advanced script names its embeddings file f"{out}/{out}_emb"
                  "--output_dir", "out", "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
                  "--max_train_steps", str(args.steps), "--learning_rate", str(args.unet_lr), "--rank",
                  str(args.rank), "--seed", str(args.seed), "--mixed_precision", "no", "--report_to", "all",
                  "--checkpointing_steps", str(args.steps + 1), "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]
    common_studio = ["-m", "studio", "train", "--model", str(args.model), "--images", str(pictures), "--init", CLASS_WORD,
                     "--method", method, "--steps", str(args.steps), "--batch", str(args.batch), "--resolution",
                     str(args.resolution), "--rank", str(args.rank), "--unet-lr", str(args.unet_lr), "--seed",
                     str(args.seed), "--memory", "fast", "--mixed-precision", "no"]
    script = str(reference_script(ref_dir, method))
    if method == "lora":
        ref = [script, *common_ref, "--instance_prompt", f"a photo of {LORA_TOKEN} {CLASS_WORD}"]
        studio = [*common_studio, "--token", LORA_TOKEN, "--class-word", CLASS_WORD,
                  "--out", f"out/{LORA_TOKEN}.safetensors"]
    else:
        # --train_text_encoder_ti_frac 1: the word learns at every step, as in the studio's joint schedule (the
        # script's default 0.5 stops it halfway but keeps its forward and backward).
        ref = [script, *common_ref, "--instance_prompt", f"a photo of {TOKEN_ABSTRACTION} {CLASS_WORD}",
               "--token_abstraction", TOKEN_ABSTRACTION, "--num_new_tokens_per_abstraction", str(args.vectors),
               "--train_text_encoder_ti", "--train_text_encoder_ti_frac", "1.0", "--text_encoder_lr", str(args.word_lr)]
        studio = [*common_studio, "--token", PIVOTAL_TOKEN, "--vectors", str(args.vectors), "--lr", str(args.word_lr),
                  "--out", "out/sks.safetensors"]
    return {"reference": ref, "studio": [*studio, *args.studio_arg]}


def floor_command(method: str, args, pictures: Path) -> list[str]:
    """`train_floor`'s command line for `method`, after `python`."""
    return [str(Path(__file__).resolve()), "--child", "floor", "--", "--images", str(pictures), "--steps",
            str(args.steps), "--batch", str(args.batch), "--rank", str(args.rank), "--unet-lr", str(args.unet_lr),
            "--seed", str(args.seed), "--model", str(args.model), *(["--word"] if method == "pivotal" else [])]


def child_command(kind: str, argv: list[str], result_file: Path) -> list[str]:
    """`argv` (from `commands`) run by this file's `child` inside the peak-memory measurement."""
    side = {"reference": argv, "studio": argv[2:], "floor": argv[4:]}[kind]
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind, RESULT_FLAG, str(result_file), "--",
            *side]


def child_env(kind: str, ref_dir: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1",
           # tqdm reads TQDM_* as defaults: draw every step, so that each update can be timestamped
           "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}
    paths = [str(REPO)]
    if kind == "reference" and (site := torchvision_path(ref_dir)) is not None:
        paths.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# ---- running and timing ---------------------------------------------------------------------------------------
def bar_pattern(kind: str, method: str) -> re.Pattern:
    """The tqdm bar of the training steps: diffusers' scripts call it "Steps", the studio "training <token>"."""
    desc = {"reference": "Steps", "floor": "floor",
            "studio": f"training {LORA_TOKEN if method == 'lora' else PIVOTAL_TOKEN}"}[kind]
    return re.compile(rf"{re.escape(desc)}:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def cpu_seconds(pid: int) -> float:
    """The CPU time all threads of `pid` have run so far (schedstat: nanoseconds on a CPU), which other jobs on
    the shared cores do not inflate the way they inflate wall time."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended between the listing and the read
            pass
    return total / 1e9


def rss_mib(pid: int) -> float:
    """The resident memory of `pid` now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise FileNotFoundError(f"no VmRSS for process {pid}")


def run_once(kind: str, method: str, cmd: list[str], env: dict[str, str], run_dir: Path, warmup: int) -> dict:
    """Run one side to the end; return its steady-state seconds per step (wall and CPU) and peak memory."""
    run_dir.mkdir(parents=True)
    result_file = run_dir / "result.json"
    pattern, seen, cpu, log, loaded_mib = bar_pattern(kind, method), {}, {}, [], None
    started = time.perf_counter()
    process = subprocess.Popen(child_command(kind, cmd, result_file), cwd=run_dir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pending, decoder = "", codecs.getincrementaldecoder("utf-8")(errors="replace")  # a read may split a bar glyph
    while chunk := os.read(process.stdout.fileno(), 65536):
        now = time.perf_counter()
        text = decoder.decode(chunk)
        pending += text
        # tqdm starts each redraw with "\r" and ends it with nothing, so the last piece is looked at too: a bar
        # line is written whole, and waiting for the next "\r" would date each step at the one after it.
        *pieces, pending = re.split(r"[\r\n]", pending)
        for piece in [*pieces, pending]:
            if (match := pattern.search(piece)) and (step := int(match.group(1))) not in seen:
                seen[step] = now
                try:
                    cpu[step] = cpu_seconds(process.pid)
                    if step == warmup:  # libraries, model and training state loaded, steps running
                        loaded_mib = rss_mib(process.pid)
                except FileNotFoundError:  # the process already ended (its last bar line was still in the pipe)
                    pass
        log.append(text)
    process.wait()
    tail = "".join(log)[-3000:]
    if process.returncode != 0 or not result_file.is_file():
        sys.exit(f"the {kind} side of {method} failed (exit code {process.returncode}):\n{tail}")
    last = max(seen, default=0)
    if last < warmup + 1:
        sys.exit(f"the {kind} side of {method} showed {last} steps, fewer than --warmup {warmup} + 1: give more "
                 f"--steps or a smaller --warmup\n{tail}")
    if kind != "floor":
        check_output(kind, method, run_dir / "out")
    memory = json.loads(result_file.read_text())
    cpu_last = max(cpu, default=0)
    return {"s_per_step": (seen[last] - seen[warmup]) / (last - warmup),
            "cpu_s_per_step": (cpu[cpu_last] - cpu[warmup]) / (cpu_last - warmup)
            if warmup in cpu and cpu_last > warmup else None,
            "window": [warmup, last],
            "startup_s": seen[min(seen)] - started, "total_s": time.perf_counter() - started,
            "peak_mib": memory["peak_mib"], "how": memory["how"], "peak_rss_mib": memory["peak_rss_mib"],
            "loaded_rss_mib": loaded_mib,
            "above_loaded_mib": memory["peak_rss_mib"] - loaded_mib if loaded_mib is not None else None}


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors file, read from its JSON header."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return [k for k in json.loads(f.read(size)) if k != "__metadata__"]


def check_output(kind: str, method: str, out: Path) -> None:
    """Exit unless the side wrote LoRA weights (and, for pivotal, the word): a run that trained something
    else (say, `--method` not yet wired and Textual Inversion done instead) must not be timed as that method."""
    files = sorted(out.glob("*.safetensors"))
    keys = [k for f in files for k in safetensors_keys(f)]
    lora = [k for k in keys if "lora" in k.lower()]
    if not lora:
        sys.exit(f"the {kind} side of {method} wrote no LoRA weights to {out} (tensors: {keys[:6]}): it did not "
                 f"train a {method} LoRA")
    if method == "pivotal" and len(lora) == len(keys):
        sys.exit(f"the {kind} side of pivotal wrote LoRA weights but no word vectors to {out}")


# ---- driver ---------------------------------------------------------------------------------------------------
def prepare_pictures(root: Path) -> Path:
    """The concept's pictures alone (the reference scripts read every file of their folder as a picture, and
    the bundled set also holds concept.json)."""
    folder = root / "pictures"
    folder.mkdir(parents=True)
    for src in sorted(CONCEPT.glob("*.png")):
        shutil.copyfile(src, folder / src.name)
    return folder


def best(runs: list[dict]) -> dict:
    """The least disturbed figures: the fastest run, with the least CPU time per step and the smallest peak seen
    (each the best of its runs: other jobs only ever add to them)."""
    def least(key: str) -> float | None:
        return min((r[key] for r in runs if r[key] is not None), default=None)

    return {**min(runs, key=lambda r: r["s_per_step"]), "cpu_s_per_step": least("cpu_s_per_step"),
            "peak_mib": least("peak_mib"), "above_loaded_mib": least("above_loaded_mib")}


def print_table(summary: dict, args) -> None:
    model = "demo model" if args.model == MODEL else args.model
    print(f"{model}, {args.resolution} px, CPU, 1 thread, fp32, steps={args.steps} batch={args.batch} "
          f"rank={args.rank} repeats={args.repeats} (best of each), s/step over steps {args.warmup}..{args.steps}; "
          f"peak MB: RSS above the imported interpreter, whole run")
    print(f"{'method':9}{'ref s/step':>12}{'studio s/step':>15}{'speed ratio':>13}{'ref peak MB':>13}"
          f"{'studio peak MB':>16}{'memory ratio':>14}{'CPU-time ratio':>16}")
    for method, row in summary["methods"].items():
        ref, ours = row["reference"], row["studio"]
        cpu = f"{row['cpu_ratio']:15.2f}x" if row["cpu_ratio"] else f"{'n/a':>16}"
        print(f"{method:9}{ref['s_per_step']:12.4f}{ours['s_per_step']:15.4f}{row['speed_ratio']:12.2f}x"
              f"{ref['peak_mib']:13.1f}{ours['peak_mib']:16.1f}{row['memory_ratio']:13.2f}x{cpu}")
    print("targets: speed ratio (ref / studio) >= 1.2x, memory ratio (studio / ref) <= 1x; the CPU-time ratio is "
          "the speed ratio from each process's own CPU time per step, which other jobs on the cores do not inflate")
    for method, row in summary["methods"].items():
        ref, ours = row["reference"]["above_loaded_mib"], row["studio"]["above_loaded_mib"]
        if ref is not None and ours is not None:
            print(f"{method}: peak above the RSS at step {args.warmup} (libraries, model and training state "
                  f"loaded): reference {ref:.1f} MB, studio {ours:.1f} MB")
    for method, row in summary["methods"].items():
        if floor := row.get("floor"):
            ref, word = row["reference"], " + the word through the text encoder" if method == "pivotal" else ""
            print(f"{method} floor (UNet + LoRA{word} forward, backward and AdamW alone): {floor['s_per_step']:.4f} "
                  f"s/step ({floor['cpu_s_per_step']:.4f} CPU), peak {floor['peak_mib']:.1f} MB; the most any loop can gain over the reference (ref / "
                  f"floor): {ref['s_per_step'] / floor['s_per_step']:.2f}x wall, "
                  f"{ref['cpu_s_per_step'] / floor['cpu_s_per_step']:.2f}x CPU")


def measure(args, methods: list[str], cmds: dict, root: Path) -> None:
    """The interleaved runs (step 2 of `main`), then the table and the JSON (step 3)."""
    prepare_pictures(root)

    # 2. The runs, interleaved: reference, studio (and floor), reference, studio, ...
    runs: dict[str, dict[str, list[dict]]] = {m: {kind: [] for kind in cmds[m]} for m in methods}
    for repeat in range(args.repeats):
        for method in methods:
            for kind, cmd in cmds[method].items():
                run = run_once(kind, method, cmd, child_env(kind, args.ref_dir), root / f"{method}-{kind}-{repeat}",
                               args.warmup)
                runs[method][kind].append(run)
                print(f"{method} {kind} run {repeat + 1}: {run['s_per_step']:.4f} s/step "
                      f"({run['cpu_s_per_step'] or float('nan'):.4f} CPU), "
                      f"peak {run['peak_mib']:.1f} MiB, {run['total_s']:.1f} s in all", flush=True)

    # 3. The table and the JSON.
    torchvision = next(metadata.distributions(name="torchvision", path=[str(torchvision_path(args.ref_dir))]))
    summary = {"diffusers_commit": DIFFUSERS_COMMIT, "diffusers": metadata.version("diffusers"),
               "torch": metadata.version("torch"), "torchvision (reference only)": torchvision.version,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child_argv"},
               "commands": cmds, "methods": {}}
    for method in methods:
        ref, ours = best(runs[method]["reference"]), best(runs[method]["studio"])
        summary["methods"][method] = {
            "reference": ref, "studio": ours, "runs": runs[method],
            "speed_ratio": ref["s_per_step"] / ours["s_per_step"],
            "cpu_ratio": ref["cpu_s_per_step"] / ours["cpu_s_per_step"]
            if ref["cpu_s_per_step"] and ours["cpu_s_per_step"] else None,
            "memory_ratio": ours["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else float("nan")}
        if runs[method].get("floor"):
            summary["methods"][method]["floor"] = best(runs[method]["floor"])
    print_table(summary, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="lora,pivotal", help="comma-separated, of: " + ", ".join(REF_SCRIPTS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, interleaved; the best is shown")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timed window")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (both scripts' default)")
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="learning rate of the LoRA weights")
    parser.add_argument("--word-lr", type=float, default=5e-3, help="pivotal: learning rate of the word vectors")
    parser.add_argument("--vectors", type=int, default=2,
                        help="pivotal: vectors per word (the advanced script's default, 2)")
    parser.add_argument("--resolution", type=int, default=64, help="the demo model's native size")
    parser.add_argument("--model", type=Path, default=MODEL,
                        help="a diffusers SD 1.x folder both sides train (default: the demo model), e.g. one with SD 1.5's "
                             "shapes and random weights from benchmarks/architectures.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--studio-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for `studio train`, e.g. --studio-arg=--no-stop-when-learned "
                             "(repeat for more)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the floor runs (what no trainer of the method can drop)")
    parser.add_argument("--ref-dir", type=Path, default=DEFAULT_REF_DIR,
                        help="folder holding diffusers' scripts (and torchvision under site/)")
    parser.add_argument("--diffusers-git", type=Path,
                        help=f"a diffusers git folder to extract the scripts from, at {DIFFUSERS_COMMIT[:10]}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--dry-run", action="store_true", help="print the two command lines per method and stop")
    parser.add_argument("--child", choices=["reference", "studio", "floor"], help=argparse.SUPPRESS)
    parser.add_argument(RESULT_FLAG, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("child_argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one side, in its own process
        argv = args.child_argv[1:] if args.child_argv[:1] == ["--"] else args.child_argv
        sys.exit(child(args.child, argv, args.child_result))

    # 1. The reference scripts, and torchvision for them.
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := sorted(set(methods) - set(REF_SCRIPTS)):
        sys.exit(f"--methods takes {', '.join(REF_SCRIPTS)}, not {', '.join(unknown)}")
    # Step 0 is not comparable: the studio draws its bar before the latent cache, the scripts just before step 1.
    if args.warmup < 1 or args.steps <= args.warmup:
        sys.exit(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup}), which is at least 1")
    if args.diffusers_git:
        extract_references(args.diffusers_git, args.ref_dir)
    check_references(args.ref_dir, methods)
    if not args.dry_run and torchvision_path(args.ref_dir) is None:
        sys.exit(f"torchvision is not installed; the reference scripts import it (transforms only): "
                 f"{torchvision_install_hint(args.ref_dir)}")
    root = Path(tempfile.gettempdir(), "methods-speed-XXXXXXXX") if args.dry_run else Path(
        tempfile.mkdtemp(prefix="methods-speed-"))
    cmds = {m: {**commands(m, args, root / "pictures", args.ref_dir),
                **({} if args.no_floor else {"floor": floor_command(m, args, root / "pictures")})} for m in methods}
    if args.dry_run:
        print(f"# each in its own process and folder, one thread (OMP_NUM_THREADS=1, torch threads 1), "
              f"HF_HUB_OFFLINE=1, inside `{Path(__file__).name} --child` (peak memory); diffusers "
              f"{DIFFUSERS_COMMIT[:10]}")
        for method, pair in cmds.items():
            for kind, cmd in pair.items():
                print(f"# {method} {kind}")
                print(shlex.join(["python", *cmd]))
        return
    try:
        measure(args, methods, cmds, root)
    finally:  # each run's folder holds its trained files; only the figures are kept
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

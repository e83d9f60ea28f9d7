"""`studio train --images DIR --token T --init WORD [--method ti|xti|pivotal|lora|dreambooth|perfusion] [...]`: learn
a concept from a few pictures: a word (ti), a word per UNet layer (xti), a word and a LoRA (pivotal), a LoRA (lora), a
fine-tuned model (dreambooth) or a word and a key-locked edit (perfusion).
Runs under `accelerate launch -m studio train ...` on several processes too (README, "Training across GPUs")."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tqdm import tqdm

from studio.cli.generate_cmd import add_weight_options
from studio.engine.memory import MEMORY_MODES
from studio.training.config import LORA_TARGETS, METHODS

if TYPE_CHECKING:
    from accelerate import PartialState

    from studio.engine.memory import MemoryPreset
    from studio.engine.models import LoadedModel
    from studio.training import TrainConfig, TrainEvent


def register(subparsers: argparse._SubParsersAction) -> None:
    """The `train` subcommand and its options (in this order: `--help` and the usage line list them so)."""
    p = subparsers.add_parser("train", help="learn a concept from 3-20 pictures (Textual Inversion, pivotal, "
                                            "XTI, LoRA, DreamBooth)")
    _add_run_options(p)
    _add_variant_options(p)
    p.add_argument("--gradient-accumulation", type=int, default=1, metavar="N",
                   help="add up the gradients of N steps' batches before each update")
    _add_method_options(p)
    _add_output_options(p)
    p.set_defaults(func=run)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The pictures, the word, and how the run trains: steps, learning rate, batch, size, seed, resume, memory."""
    p.add_argument("--model", help="hub id, diffusers folder or .safetensors file (default: the built-in demo)")
    p.add_argument("--images", required=True, type=Path, help="folder of PNG/JPEG/WebP pictures of the concept")
    p.add_argument("--token", required=True, help="the new word, e.g. '<my-cat>'")
    p.add_argument("--init", default="*", help="word(s) whose embeddings start the vectors, e.g. 'cat'")
    p.add_argument("--vectors", type=int, default=1, help="vectors per word (more: more detail, less editable)")
    p.add_argument("--steps", type=int, default=400, help="optimisation steps")
    p.add_argument("--lr", default="0.005", help="learning rate, or an A1111 schedule like '0.005:100, 1e-3'")
    p.add_argument("--batch", type=int, default=4, help="pictures per step")
    p.add_argument("--template", choices=["object", "style", "captions"], default="object",
                   help="prompt templates: the paper's object or style lists, or name.txt captions beside pictures")
    p.add_argument("--resolution", type=int, help="training size (default: the model's native size)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips (for text or asymmetric concepts)")
    p.add_argument("--save-every", type=int, default=0, help="also write <token>-stepN files every N steps (each one resumable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", metavar="PATH",
                   help="continue a run from a <token>-stepN.safetensors it wrote (or a folder: its newest one); "
                        "give the same options and a larger --steps")
    p.add_argument("--memory", choices=MEMORY_MODES, default="auto",
                   help="balanced: gradient checkpointing; low-vram: also attention slicing and the VAE off the GPU "
                        "once the pictures are encoded; auto: by free GPU memory (fast on CPU)")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="autocast the frozen model (vectors stay fp32); auto: none on CPU, the model's dtype on GPU")
    add_weight_options(p)

def _add_variant_options(p: argparse.ArgumentParser) -> None:
    """The Textual Inversion paper's variants of what the word learns (ti, xti, pivotal)."""
    v = p.add_argument_group("variants", "the Textual Inversion paper's variants (ti, xti, pivotal)")
    v.add_argument("--progressive", metavar="SPEC",
                   help="progressive extension: vectors:step pairs like '1:0,2:400,3:800' (the word ends with the last)")
    v.add_argument("--per-image-tokens", action="store_true",
                   help="each picture also gets its own word ('a photo of S* with S_i'); only S* is saved")
    v.add_argument("--keep-image-words", action="store_true", help="also save the per-image words, for inspection")
    v.add_argument("--regularization", type=float, default=0.0, metavar="W",
                   help="weight of the pull back toward the init words (||v - v_init||^2)")
    v.add_argument("--keep-norm", action="store_true",
                   help="keep each vector at the vocabulary's median norm after every update")
    v.add_argument("--stop-when-learned", action=argparse.BooleanOptionalAction, default=True,
                   help="score the run every --stop-every steps on a fixed held-back draw and stop once it no longer "
                        "improves (--steps stays the upper bound)")
    v.add_argument("--stop-every", type=int, default=10, metavar="K", help="steps between two scorings")


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """What learns (`--method`) and the options of the methods that learn weights."""
    m = p.add_argument_group("method", "what learns: the word (ti), the word and a UNet LoRA (pivotal), a UNet LoRA "
                                       "for '<token> <class>' (lora, DreamBooth-LoRA), the whole UNet (dreambooth), the "
                                       "word and a key-locked edit of each cross-attention layer (perfusion)")
    m.add_argument("--method", choices=METHODS, default="ti")
    m.add_argument("--rank", type=int, default=4, help="LoRA rank (pivotal, lora)")
    m.add_argument("--lora-targets", choices=LORA_TARGETS, default="attention",
                   help="attention: every attention projection; cross-kv: cross-attention keys and values only")
    m.add_argument("--lite", action="store_true",
                   help="pivotal preset: rank 1 on the cross-attention keys and values (about 100 KB on SD 1.5)")
    m.add_argument("--unet-lr", type=float, help="learning rate of the weights (default: the method's)")
    m.add_argument("--word-steps", type=int, default=0,
                   help="pivotal: train the word alone for the first N steps, then word and LoRA together")
    m.add_argument("--class-word", help="lora/dreambooth: the class in 'a photo of <token> <class>'; perfusion: what "
                   "the keys are locked to (default: --init)")
    m.add_argument("--captions", type=Path, help="perfusion: a prompt file (one caption a line) to measure the text "
                   "encodings' covariance on (default: the model folder's captions.txt, else a bundled set)")
    m.add_argument("--init-from-encoder", nargs="?", const="demo", metavar="ADAPTER",
                   help="ti: encode the pictures with an IP-Adapter first (default: the demo's; a file or "
                        "owner/repo/path) and train the word a few steps beside them; writes one image concept")
    m.add_argument("--prior-preservation", action="store_true",
                   help="lora/dreambooth: also learn on class pictures the base model draws once (cached)")
    m.add_argument("--class-images", type=int, default=20, help="class pictures for prior preservation")
    m.add_argument("--prior-weight", type=float, default=1.0, help="weight of the prior-preservation loss")
    m.add_argument("--lora-format", choices=["diffusers", "kohya"], default="diffusers",
                   help="pivotal/lora file: diffusers (load_lora_weights; a pivotal word beside it as <name>_emb) or "
                        "kohya (one file; a pivotal word bundled as A1111 does)")
    m.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"], help="pivotal/lora weights in the file "
                   "(default fp32; --lite: fp16)")
    m.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes' 8-bit AdamW for the weights (CUDA)")
    m.add_argument("--text-encoder-lora", action="store_true",
                   help="lora/pivotal: also a LoRA on the text encoders' attention (diffusers' --train_text_encoder), "
                        "saved in the same file")
    m.add_argument("--text-encoder-rank", type=int, help="rank of the text-encoder LoRA (default: --rank)")
    m.add_argument("--text-encoder-lr", type=float,
                   help="learning rate of the text-encoder LoRA (default: the weights' learning rate)")

def _add_output_options(p: argparse.ArgumentParser) -> None:
    """Where the files go, and whether existing ones may be replaced."""
    p.add_argument("--out", type=Path, default=Path("."),
                   help="folder for the concept files, or the final file itself when it ends in .safetensors "
                        "(dreambooth: the model folder); an existing file or model folder is kept (exit 2 before "
                        "training) unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs of the same names (a model folder only if the studio wrote it)")


def run(args: argparse.Namespace) -> int:
    """Train as the options say; 0 once the run has ended and its files are written."""
    from studio.engine.memory import preset
    from studio.training import Trainer
    from studio.training.trainer import check_train_output

    mode = preset(args.memory)  # `auto` resolves here, once, by free GPU memory
    cfg = _train_config(args, mode)
    # Before the model loads: a run never ends by failing to write, nor replaces what was not asked to be replaced.
    check_train_output(cfg, args.images, args.out, overwrite=args.overwrite)
    if cfg.init_from_encoder:  # the adapter and its image encoder are here and fit the model, before it loads
        from studio.engine.learned.ip_adapter import adapter_file_shapes, image_encoder_folder, resolve_adapter
        from studio.engine.learned.ip_adapter_fit import check_before_loading
        from studio.engine.models import DEMO_MODEL_DIR

        adapter = resolve_adapter(cfg.init_from_encoder, who="--init-from-encoder")
        check_before_loading(adapter_file_shapes(adapter), image_encoder_folder(adapter),
                             args.model or str(DEMO_MODEL_DIR), f"--init-from-encoder {adapter.name}")
    model, processes = _load_model(args)
    print(f"memory mode: {mode.name}{' (auto)' if args.memory == 'auto' else ''}: {mode.explain(model.device)}")
    # Out of memory ends the run with a `failed` line naming the mode to switch to (the last good vectors saved),
    # then the one-line error of `studio.cli.main`, exit code 2.
    with tqdm(total=cfg.steps, desc=f"training {cfg.token}", disable=not processes.is_main_process) as bar:
        Trainer(model, cfg, args.images, args.out, overwrite=args.overwrite).run(
            _progress_lines(bar) if processes.is_main_process else None)
    return 0


def _train_config(args: argparse.Namespace, mode: MemoryPreset) -> TrainConfig:
    """The run's TrainConfig from the options, in memory mode `mode` (`--lr`: a number, or an A1111 schedule)."""
    from studio.training import TrainConfig
    from studio.training.config import lite

    try:
        lr, schedule = float(args.lr), "constant"
    except ValueError:
        lr, schedule = 0.005, args.lr
    cfg = TrainConfig(args.token, init_text=args.init, n_vectors=args.vectors, steps=args.steps, learning_rate=lr,
                      lr_schedule=schedule, batch_size=args.batch, template=args.template,
                      resolution=args.resolution, flip=not args.no_flip, save_every=args.save_every, seed=args.seed,
                      resume=args.resume, memory=mode.name, mixed_precision=args.mixed_precision,
                      gradient_accumulation=args.gradient_accumulation, method=args.method, rank=args.rank,
                      lora_targets=args.lora_targets, unet_lr=args.unet_lr, word_steps=args.word_steps,
                      class_word=args.class_word, prior_preservation=args.prior_preservation,
                      class_images=args.class_images, prior_weight=args.prior_weight,
                      use_8bit_adam=args.use_8bit_adam, lora_format=args.lora_format, progressive=args.progressive,
                      per_image_tokens=args.per_image_tokens, keep_image_words=args.keep_image_words,
                      regularization=args.regularization, keep_norm=args.keep_norm,
                      stop_when_learned=args.stop_when_learned, stop_every=args.stop_every,
                      text_encoder_lora=args.text_encoder_lora, text_encoder_rank=args.text_encoder_rank,
                      text_encoder_lr=args.text_encoder_lr,
                      captions=str(args.captions) if args.captions else None,
                      init_from_encoder=args.init_from_encoder)
    if args.lite:
        lite(cfg)
    if args.save_precision:
        cfg.save_precision = args.save_precision
    return cfg


def _load_model(args: argparse.Namespace) -> tuple[LoadedModel, PartialState]:
    """The model `--model` names, and this process among those of the run.

    Under `accelerate launch`, each process loads the model on its own device (cuda:<local rank>, or the CPU) and
    only the main one prints."""
    import torch
    from accelerate import PartialState

    from studio.engine.models import LoadOptions, ModelManager

    # With no GPU, processes launched by `accelerate launch --multi_gpu` (torch's elastic launcher) join over gloo:
    # accelerate makes that group only when told the run is on the CPU.
    processes = PartialState(cpu=not torch.cuda.is_available())
    device = str(processes.device) if processes.num_processes > 1 else None
    options = LoadOptions(device=device, dtype=args.dtype, quantize=args.quantize, config=args.model_config)
    return ModelManager().load(args.model, options), processes


def _progress_lines(bar: tqdm) -> Callable[[TrainEvent], None]:
    """The trainer's events as `bar`'s progress and as lines printed above it."""

    def on_event(event: TrainEvent) -> None:
        if event.kind == "step":
            bar.update(1)
            bar.set_postfix(loss=f"{event.loss:.4f}")
        elif event.kind == "started":
            bar.update(event.step)  # a resumed run starts past zero
            tqdm.write(f"started: {event.message}")
        elif event.kind in ("warning", "checkpoint", "finished", "failed", "cancelled"):
            tqdm.write(f"{event.kind}: {event.message or event.path}")

    return on_event

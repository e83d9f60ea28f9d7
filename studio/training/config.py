"""TrainConfig: every training option (Textual Inversion and the weight-tuning methods), with defaults and where
they come from."""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.engine.memory import MEMORY_MODES
from studio.engine.names import check_word


# studio/training/methods: what each one learns and saves
METHODS = ("ti", "xti", "pivotal", "lora", "dreambooth", "perfusion")
LORA_TARGETS = ("attention", "cross-kv")  # every attention projection of the UNet | cross-attention keys and values


@dataclass
class TrainConfig:
    token: str  # the new word, e.g. "<cat-toy>"; for lora/dreambooth the identifier written in the prompt
    init_text: str = "*"  # words whose embeddings start the vectors (A1111's default is "*"; a class word is better)
    n_vectors: int = 1  # vectors per token (paper: 1; A1111 allows 1-75)
    template: str = "object"  # "object" | "style" (the paper's template lists) | "captions" (name.txt beside pictures)
    steps: int = 400  # demo model: ~2 min on a 2-core CPU; SD 1.5: 3,000 (diffusers README), 5,000 (paper)
    batch_size: int = 4  # paper: 4 per GPU
    learning_rate: float = 5e-3  # paper's base LR 0.005 (A1111's default too)
    lr_schedule: str = "constant"  # "constant" | "cosine" | A1111 steps "0.005:100, 1e-3:1000, 1e-5"
    warmup_steps: int = 0
    resolution: int | None = None  # None: the model's native size (64 for the demo, 512 for SD 1.5)
    flip: bool = True  # horizontal flip augmentation; turn off for text or asymmetric concepts
    seed: int = 0
    weight_decay: float = 0.0  # decay would pull the vectors to zero; diffusers uses 1e-2 on the whole table
    save_every: int = 0  # 0: only the final file
    preview_every: int = 0  # 0: no previews
    preview_prompts: list[str] = field(default_factory=lambda: ["a photo of {}"])
    regularization: float = 0.0  # paper's variant: weight of ||v - v_init||^2
    keep_norm: bool = False  # after each update, scale each vector to the vocabulary's median norm (OneTrainer-like)
    # Paper's progressive extension: "1:0,2:400,3:800" = one vector from step 0, a second from 400, a third from 800;
    # the word then has the last count (n_vectors is set to it). Later vectors start from the init words.
    progressive: str | None = None
    per_image_tokens: bool = False  # paper's variant: "a photo of S* with S_i", each picture its own word S_i
    keep_image_words: bool = False  # also write the per-image words (for inspection) into <name>-image-words/
    # Stop when learned: every `stop_every` steps the run is scored on a fixed held-back draw (fixed latents, noise,
    # timesteps and prompts); it stops once the best score of the last `stop_window` scorings is no more than
    # `stop_threshold` (relative) below the best before them. `steps` stays the upper bound.
    stop_when_learned: bool = True
    stop_every: int = 10
    stop_window: int = 3
    stop_threshold: float = 0.01
    max_grad_norm: float = 1.0
    resume: str | None = None  # a `<token>-stepN.safetensors` this trainer wrote (or its folder: the newest one)
    memory: str = "auto"  # one of studio.engine.memory.MEMORY_MODES, as in generation
    mixed_precision: str = "auto"  # "no" | "fp16" | "bf16" | "auto" (CPU: "no"; GPU: the loaded dtype, else bf16)
    gradient_accumulation: int = 1  # steps whose gradients add up before one update (accelerate's accumulate)

    # What learns (studio/training/methods): "ti" the word only; "xti" a word per cross-attention layer (P+);
    # "pivotal" the word and a UNet LoRA; "lora"
    # DreamBooth-LoRA (a UNet LoRA for "a photo of <token> <class>"); "dreambooth" the whole UNet; "perfusion" the word
    # and a key-locked rank-one edit of every cross-attention layer (Tewel et al. 2023).
    method: str = "ti"
    rank: int = 4  # LoRA rank (diffusers' dreambooth-lora default 4); lora_alpha = rank, so the scale is 1
    lora_targets: str = "attention"  # "cross-kv": only attn2.to_k/to_v (the "lite" preset, with rank 1)
    unet_lr: float | None = None  # None: the method's default (lora/pivotal 1e-3 on the demo model's scale, ...)
    word_steps: int = 0  # pivotal: the first N steps train the word alone, then word and LoRA together
    class_word: str | None = None  # lora/dreambooth: "a photo of <token> <class_word>"; None: init_text
    prior_preservation: bool = False  # DreamBooth's prior loss on class pictures the base model draws once
    class_images: int = 20  # class pictures to generate (cached on disk beside the output, reused by later runs)
    prior_weight: float = 1.0  # DreamBooth's prior loss weight (diffusers' default 1.0)
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit (CUDA only) for the weights; the words stay in AdamW
    lora_format: str = "diffusers"  # pivotal/lora file: "diffusers" (load_lora_weights) | "kohya" (A1111 bundle)
    save_precision: str = "fp32"  # pivotal/lora file's weights: "fp32" | "fp16" | "bf16" (kohya's --save_precision)
    # lora/pivotal: a LoRA on the text encoders' attention projections (q, k, v, out_proj) learns beside the UNet's,
    # as diffusers' DreamBooth-LoRA and advanced scripts' --train_text_encoder; the prompts are then encoded with
    # gradients every step (not once). Saved in the same file (text_encoder. / lora_te_ keys).
    text_encoder_lora: bool = False
    text_encoder_rank: int | None = None  # None: `rank` (diffusers' scripts give both LoRAs their one --rank)
    # None: the UNet LoRA's learning rate, as diffusers' SD 1.x train_dreambooth_lora.py trains both at its one
    # --learning_rate (its SDXL and advanced scripts default to 5e-6 beside the UNet's 1e-4).
    text_encoder_lr: float | None = None
    # perfusion: a prompt file (one caption a line) whose text encodings' covariance the edit is measured in; None:
    # the model folder's captions.txt (the demo model ships its world's), else the studio's bundled captions.
    captions: str | None = None
    # Quick-tuning (E4T-style, Gal et al. 2023: an encoder's output as the start, then a few steps): an IP-Adapter
    # ("demo", a file, a hub file "owner/repo/path", as `studio encode --adapter`) encodes the pictures first; the
    # word then trains from `init_text` with that image prompt applied beside it, and the result is one image concept
    # holding both (docs/encoders.md). ti only. None: off.
    init_from_encoder: str | None = None

    def __post_init__(self) -> None:
        check_word(self.token, "new word")
        if self.progressive:
            self.n_vectors = progressive_schedule(self.progressive)[-1][0]
        if not 1 <= self.n_vectors <= 75:
            raise ValueError(f"vectors per token must be between 1 and 75 (CLIP's prompt length), not {self.n_vectors}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be at least 1")
        if self.template not in ("object", "style", "captions"):
            raise ValueError(f"template must be 'object', 'style' or 'captions', not {self.template!r}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(map(repr, MEMORY_MODES))}, not {self.memory!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"LoRA targets must be one of {', '.join(LORA_TARGETS)}, not {self.lora_targets!r}")
        if not 1 <= self.rank <= 1024:
            raise ValueError(f"LoRA rank must be between 1 and 1024, not {self.rank}")
        if self.save_precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"save precision must be 'fp32', 'fp16' or 'bf16', not {self.save_precision!r}")
        if self.lora_format not in ("diffusers", "kohya"):
            raise ValueError(f"LoRA format must be 'diffusers' or 'kohya', not {self.lora_format!r}")
        if self.text_encoder_lora and self.method not in ("lora", "pivotal"):
            raise ValueError(f"a text-encoder LoRA is for the lora and pivotal methods, not {self.method!r}")
        if self.text_encoder_rank is not None and not 1 <= self.text_encoder_rank <= 1024:
            raise ValueError(f"text-encoder LoRA rank must be between 1 and 1024, not {self.text_encoder_rank}")
        if self.prior_preservation and self.method not in ("lora", "dreambooth"):
            raise ValueError(f"prior preservation is for the lora and dreambooth methods, not {self.method!r}")
        if (self.progressive or self.per_image_tokens or self.keep_norm) and self.method not in ("ti", "xti", "pivotal"):
            raise ValueError(f"progressive, per-image tokens and the norm control are for the ti, xti and pivotal "
                             f"methods, not {self.method}")
        if self.init_from_encoder and (self.method != "ti" or self.per_image_tokens or self.progressive):
            raise ValueError("--init-from-encoder trains a plain word beside the image prompt: use it with --method ti, "
                             "without --per-image-tokens or --progressive")
        if self.stop_every < 1 or self.stop_window < 1:
            raise ValueError("stop-when-learned's interval and window must be at least 1")
        if self.gradient_accumulation < 1 or self.word_steps < 0 or self.class_images < 1:
            raise ValueError("gradient accumulation and class pictures must be at least 1, word steps at least 0")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16', 'bf16' or 'auto', not {self.mixed_precision!r}")


def lite(config: TrainConfig) -> TrainConfig:
    """The `lite` pivotal preset: rank 1 on the cross-attention keys and values only, saved in fp16 (SD 1.5 shapes:
    32 pairs, 49,536 numbers, about 100 KB with the word; in fp32 it would pass 200 KB)."""
    config.rank, config.lora_targets, config.save_precision = 1, "cross-kv", "fp16"
    return config


def progressive_schedule(spec: str) -> list[tuple[int, int]]:
    """`"1:0,2:400,3:800"` -> [(1, 0), (2, 400), (3, 800)]: vector counts from their first step, both rising."""
    try:
        pairs = [tuple(int(x) for x in part.split(":")) for part in spec.split(",") if part.strip()]
        ok = pairs and all(len(p) == 2 for p in pairs) and pairs[0][1] == 0 and pairs[0][0] >= 1
        ok = ok and all(b[0] > a[0] and b[1] > a[1] for a, b in zip(pairs, pairs[1:]))
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"cannot read progressive schedule {spec!r}: give rising vectors:step pairs from step 0, "
                         "like '1:0,2:400,3:800'")
    return pairs


def parse_lr_schedule(schedule: str, base_lr: float, warmup_steps: int, total_steps: int):
    """Return `lr(step)`. Understands constant, cosine and A1111's "0.005:100, 1e-3:1000, 1e-5" syntax."""
    import math

    if schedule in ("constant", "cosine"):
        def lr(step: int) -> float:
            warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
            if schedule == "cosine":
                return base_lr * warm * 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps)))
            return base_lr * warm
        return lr
    pieces = []
    try:
        for part in schedule.split(","):
            value, _, until = part.strip().partition(":")
            pieces.append((float(value), int(until) if until else None))
    except ValueError as exc:
        raise ValueError(f"cannot read learning-rate schedule {schedule!r}: use 'constant', 'cosine' or "
                         "A1111's form like '0.005:100, 1e-3:1000, 1e-5'") from exc

    def stepped(step: int) -> float:
        for value, until in pieces:
            if until is None or step < until:
                return value
        return pieces[-1][0]
    return stepped

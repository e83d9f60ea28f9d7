"""`pivotal` (the word and a UNet LoRA) and `lora` (DreamBooth-LoRA: a UNet LoRA for "<token> <class>"), each with an
optional LoRA on the text encoders' attention (`text_encoder_lora`, diffusers' scripts' `--train_text_encoder`).

The LoRA is a peft adapter added to the shared UNet (and text encoders) for the run (under the model's lock, the only
adapter active) and deleted at its end, so generation afterwards computes what it computed before. It starts as
diffusers' scripts start theirs (`init_lora_weights="gaussian"`: A random, B zero, so step 0 is the base model), from
the run's seed. The text encoders' adapter is added and deleted by peft's own functions (`inject_adapter_in_model`,
`delete_adapter`), as the LoRA runtime loads one: transformers 5.25's `add_adapter` asks for peft >= 0.22.0 (0.21.2 is
installed). Files are written by `studio.engine.learned.lora_export` and read back by
`studio.engine.learned.lora_files.load_lora`, the LoRA runtime's reader:
- diffusers' form (default): what `load_lora_weights` reads (`unet.…`, `text_encoder.…` keys); pivotal's word goes
  to diffusers' pivotal words file `<stem>_emb.safetensors` beside it (`load_textual_inversion(file, token=...)`).
- kohya's form (`lora_format="kohya"`): `lora_unet_…` and `lora_te_…` (SDXL `lora_te1_`/`lora_te2_`) keys; pivotal's
  word bundled in the same file as A1111 bundles them (`bundle_emb.<word>.string_to_param.*`) — one file for A1111,
  Forge and ComfyUI, which diffusers' `load_lora_weights` refuses ("all LoRA param names contain 'lora'"), hence not
  the default.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from studio.engine.learned.lora import DENOISER_PARTS, LoraFile, lora_modules
from studio.engine.learned.lora_files import load_lora
from studio.engine.learned.word import Concept
from studio.training.methods.base import Method

ADAPTER = "studio-train"  # the run's adapter in the shared denoiser (and text encoders); never a name the cache gives
TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]  # diffusers' scripts' text-encoder targets


class LoraWeights(Method):
    """A UNet LoRA (and with `text_encoder_lora` one on each text encoder) that learns; what `pivotal` and `lora`
    share."""

    # diffusers' scripts use 1e-4 on SD 1.5 for 500+ steps; the demo model's 400-step default needs more
    # (measured in docs/benchmarks.md, "Weight-tuning methods").
    default_unet_lr = 1e-3

    def add_weights(self) -> dict[str, torch.nn.Parameter]:
        from peft import LoraConfig

        from studio.training.data import TrainError

        cfg, unet, spec = self.config, self.unet, self.model.spec
        if cfg.lora_format == "kohya" and spec.denoiser != "unet":  # refused before any step, no file written
            raise TrainError(f"--lora-format kohya on {spec.title}: the studio writes kohya's names for UNet LoRAs "
                             "only; train with --lora-format diffusers (read by load_lora_weights, ComfyUI, Forge)")
        # the family's targets (`ModelFamily.lora_targets`: diffusers' dreambooth-lora scripts' defaults)
        targets = spec.lora_prompt_kv if cfg.lora_targets == "cross-kv" else list(spec.lora_targets)
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian", target_modules=targets)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(cfg.seed)  # peft draws lora_A from the global generator: seed it, keep it
            # peft warns that an adapter joins the LoRA cache's ones: the run's adapter is meant to sit beside them
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            unet.add_adapter(config, adapter_name=ADAPTER)
            # The text encoders' draw next from the same stream, as diffusers' scripts add theirs after the UNet's.
            self._add_text_encoder_adapters()
        unet.set_adapter(ADAPTER)  # the cached LoRAs of earlier requests stay loaded, inactive
        unet.enable_lora()
        self.model.lora_cache.rescan()  # new peft layers may have been made: the cache walks the modules again
        marker = f".{ADAPTER}."
        return {f"{part}.{name.replace(marker, '.')}": param
                for part, module in {spec.denoiser: unet, **self._text_encoders()}.items()
                for name, param in module.named_parameters() if marker in name}

    def _text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders a text-encoder LoRA learns in, by their pipeline name (none without one)."""
        if not self.config.text_encoder_lora:
            return {}
        return {part: module for part, module in lora_modules(self.model.pipe).items() if part not in DENOISER_PARTS}

    def learning_encoders(self) -> list[torch.nn.Module]:
        return list(self._text_encoders().values())

    def _add_text_encoder_adapters(self) -> None:
        """The run's adapter on each text encoder's attention projections, the only one active (the LoRA cache's
        adapters of earlier requests stay loaded, inactive), its pairs trainable."""
        from peft import LoraConfig
        from peft.functional import inject_adapter_in_model, set_adapter

        rank = self.config.text_encoder_rank or self.config.rank
        for encoder in self._text_encoders().values():
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=TEXT_ENCODER_ATTENTION)
            inject_adapter_in_model(config, encoder, adapter_name=ADAPTER)
            set_adapter(encoder, ADAPTER)  # its pairs trainable, the others' not
            for layer in _tuner_layers(encoder):
                layer.enable_adapters(True)

    def text_encoder_lr(self) -> float:
        return self.config.text_encoder_lr if self.config.text_encoder_lr is not None else self.unet_lr()

    def weight_groups(self, weights: dict[str, torch.nn.Parameter]) -> list[dict]:
        """The denoiser's LoRA at the weights' learning rate, the text encoders' (if any) at `text_encoder_lr`."""
        denoiser = f"{self.model.spec.denoiser}."
        groups = [{"params": [p for n, p in weights.items() if n.startswith(denoiser)], "initial_lr": self.unet_lr()}]
        text = [p for n, p in weights.items() if not n.startswith(denoiser)]
        return groups + ([{"params": text, "initial_lr": self.text_encoder_lr()}] if text else [])

    def remove_weights(self) -> None:
        unet = self.unet
        with warnings.catch_warnings():  # "was active which is now deleted": every adapter is turned off below
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            unet.delete_adapters(ADAPTER)
            for encoder in self._text_encoders().values():
                _delete_text_encoder_adapter(encoder)
        if getattr(unet, "peft_config", None):
            unet.disable_lora()  # the cache's adapters are off between requests (learned.lora.loras_applied)
        self.model.lora_cache.rescan()

    def save(self, path: Path, word: Concept | None, weights: dict[str, torch.Tensor], step: int) -> Path:
        from studio.engine.learned.lora_export import export_lora

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.config.save_precision]
        tensors = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in weights.items()}
        modules: dict[str, set[str]] = {}  # part ("unet" or "transformer", "text_encoder", ...) -> its modules
        for name in tensors:
            part, module = name.split(".", 1)
            modules.setdefault(part, set()).add(module.rsplit(".lora_", 1)[0])
        ranks = tuple(sorted({int(t.shape[0]) for name, t in tensors.items() if ".lora_A." in name}))
        lora = LoraFile(path=path, state_dict=tensors, source_format="diffusers", ranks=ranks,
                        modules={part: sorted(names) for part, names in modules.items()},
                        families=(self.model.family,), size_bytes=0, words=[word] if word is not None else [])
        written = export_lora(lora, path.parent, path.name, self.config.lora_format, overwrite=True).path
        return self._add_metadata(written, step)

    def _add_metadata(self, path: Path, step: int) -> Path:
        """The run's facts in the file's metadata beside what the writer put there (diffusers' adapter config):
        base model, steps, method, and for DreamBooth-LoRA the phrase it learned (the session then knows that
        "<token>" in a prompt is that phrase's plain text, not a missing word)."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from studio.engine.files import atomic_write
        from studio.engine.learned.lora_files import PHRASE_KEY

        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        metadata.update({f"studio_{key}": value for key, value in self.meta(step).items()})
        if not self.learns_word:
            metadata[PHRASE_KEY] = self.phrase()
        tensors = load_file(str(path))
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def result(self, path: Path, word: Concept | None) -> LoraFile:
        return load_lora(path, self.model.denoiser.config)


class Pivotal(LoraWeights):
    """The word and a UNet LoRA around it (pivotal tuning: Roich et al. 2022; cloneofsimo's lora_pti, diffusers'
    advanced script). `word_steps` > 0 trains the word alone first (the pivot), then both."""

    name = "pivotal"
    summary = ("Pivotal tuning: the word and a small LoRA on the UNet's attention learn together; one file "
               "(<= 200 KB with the lite preset on SD 1.5); write the word.")

    def weights_learn(self, step: int) -> bool:
        return step > self.config.word_steps


class DreamBoothLora(LoraWeights):
    """DreamBooth-LoRA (Ruiz et al. 2023 with a LoRA): no new vectors; the prompts say "<token> <class>" and the LoRA
    learns what they mean; optional prior preservation keeps "<class>" as the base model draws it."""

    name = "lora"
    summary = ("DreamBooth-LoRA: a LoRA learns \u201c<word> <class word>\u201d (class word: the start word unless set); "
               "a file of a few MB on SD 1.5; write the phrase.")
    learns_word = False

    def phrase(self) -> str:
        return f"{self.config.token} {self.trainer.class_word}".strip()


def _tuner_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


def _delete_text_encoder_adapter(encoder: torch.nn.Module) -> None:
    """Take the run's adapter out of `encoder` by peft's public function (what diffusers' `delete_adapters` does for
    a transformers model) and turn the cache's adapters off, as they are between requests."""
    from peft.functional import delete_adapter

    configs = getattr(encoder, "peft_config", None) or {}
    if ADAPTER in configs:
        delete_adapter(encoder, ADAPTER, prefix="lora_")
        configs.pop(ADAPTER)
        if not configs:
            del encoder.peft_config
    for layer in _tuner_layers(encoder):
        layer.enable_adapters(False)

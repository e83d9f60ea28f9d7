"""`dreambooth`: the whole UNet fine-tuned on "<token> <class>" (Ruiz et al. 2023), optionally with prior
preservation. It learns a copy of the UNet, so the shared model serves other requests unchanged; the result is a
diffusers model folder that `StableDiffusionPipeline.from_pretrained` and the Model tab load as a base model."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch

from studio.engine.files import check_new_output, replace_folder
from studio.engine.learned.word import Concept
from studio.training.methods.base import Method

FOLDER_MODE = 0o755  # as `mkdir` makes folders under the usual umask


class DreamBooth(Method):
    name = "dreambooth"
    summary = ("DreamBooth: the whole UNet learns \u201c<word> <class word>\u201d; the result is a new model folder, "
               "loaded in the Model tab.")
    save_dtype = torch.float32  # the learned UNet is written as it learned (fp32 master weights), whatever the model's
    learns_word = False
    writes_folder = True
    # The run's facts (word, prompt, base model, steps) in every model folder it writes; a folder holding it is one
    # the studio wrote, which --overwrite (and --resume) may replace.
    folder_marker = "studio_training.json"
    # diffusers' train_dreambooth.py uses 5e-6 on SD 1.5 for ~400 steps at batch 1; the demo model's UNet is 45x
    # smaller and its pictures 64 px (measured in docs/benchmarks.md, "Weight-tuning methods").
    default_unet_lr = 1e-4

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self._unet: torch.nn.Module | None = None

    @property
    def unet(self) -> torch.nn.Module:
        return self._unet if self._unet is not None else self.model.denoiser

    def add_weights(self) -> dict[str, torch.nn.Parameter]:
        from studio.training.data import TrainError

        if self.model.quantize != "none":  # bitsandbytes' int8/NF4 weights are not parameters that can learn
            raise TrainError(f"dreambooth fine-tunes every weight of the denoiser, which is loaded in "
                             f"{self.model.quantize}; load the model without --quantize, or train pivotal or lora")
        unet = copy.deepcopy(self.model.denoiser).to(torch.float32)  # fp32 master weights, the model's dtype under
        if getattr(unet, "peft_config", None):                           # autocast
            unet.unload_lora()  # the LoRA cache's adapters are the shared UNet's, not the model's to fine-tune
        self._unet = unet
        self._unet.requires_grad_(True)
        self._unet.train()
        return {f"unet.{name}": param for name, param in self._unet.named_parameters()}

    def remove_weights(self) -> None:
        self._unet = None

    def phrase(self) -> str:
        return f"{self.config.token} {self.trainer.class_word}".strip()

    def save(self, path: Path, word: Concept | None, weights, step: int) -> Path:
        """The base pipeline with the learned UNet, as a diffusers folder, written beside and swapped into place
        (`replace_folder`); what was at `path` is replaced only if the studio wrote it (the trainer checked that
        before training; checked again here, since the folder may have changed meanwhile)."""
        pipe = self.model.pipe
        unet = self._unet
        components = {**pipe.components, "unet": unet}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        tmp.chmod(FOLDER_MODE)  # mkdtemp makes it 0700
        try:
            type(pipe)(**components).save_pretrained(tmp, safe_serialization=True)
            (tmp / self.folder_marker).write_text(json.dumps({**self.meta(step), "token": self.config.token,
                                                              "prompt": self.phrase()}, indent=1))
            check_new_output(path, overwrite=True, folder=True, marker=self.folder_marker)
            replace_folder(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def result(self, path: Path, word: Concept | None) -> Path:
        return path

"""Image prompts (IP-Adapter, Ye et al. 2023): a concept made of pictures' image embeddings instead of a word's vectors.

An `ImageConcept` holds the image embeddings of a few reference pictures (what a CLIP vision model made of them) and
names the IP-Adapter that reads them. In a prompt it is written like a word (`<my-dog>`); the word's place in the text
takes the concept's `prompt_text` (often a class word, or nothing), and its pictures condition every cross-attention
layer through the adapter's decoupled cross-attention, at the request's weight (diffusers' `set_ip_adapter_scale`).

How it runs (`studio.engine.learned.ip_adapter`): the adapter is converted once per model by diffusers' own loader
functions and kept outside the UNet; a request that uses image concepts patches the shared UNet for its length as
`load_ip_adapter` + `set_ip_adapter_scale` would leave it (one adapter slot per concept, its weight the slot's
scale) and passes the embeddings as `ip_adapter_image_embeds`; `finally` puts the UNet back as loaded. Weight 0 adds
nothing to the request. Files: `image_prompt_files`; pictures -> concept: `image_encoding`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.engine.learned.ip_adapter import ImagePromptError, image_prompts_applied
from studio.engine.learned.word import Concept, ConceptMismatchError, check_fits
from studio.engine.names import WordError, check_word
from studio.engine.prompts import split_concept_words

IMAGE_CONCEPT_KIND = "image"
EMBEDS_ARGUMENT = "ip_adapter_image_embeds"  # the pipelines' argument (diffusers' StableDiffusion*Pipeline.__call__)
# A picture's parameters (A1111's infotext) list a request's image concepts under this key, one quoted value as A1111
# writes "Lora hashes": "<token>: <weight> <adapter> [<adapter digest, 12 digits>], ..."
INFOTEXT_KEY = "Image concepts"
_INFOTEXT_ITEM = re.compile(r"(\S+): (\S+) (.*?)(?: \[([0-9a-f]+)\])?(?:, |$)")


@dataclass(eq=False)  # identity equality, as for words: the tensors make == ambiguous
class ImageConcept:
    """Reference pictures as image embeddings for one IP-Adapter.

    `embeds`: one row per picture, `[n, dim]` for a plain adapter (the vision model's projected `image_embeds`) or
    `[n, tokens, width]` for a Plus adapter (its penultimate hidden states); `negative`: what the adapter is given for
    the unconditional half of guidance, of the same shape (zeros for plain; the encoding of a black picture for
    Plus, as diffusers' `encode_image` makes them). `adapter`: where the adapter is (`image_prompt_files.find_adapter`);
    `adapter_sha256`: its tensors' digest, so another file at that place is refused. `word`: a quick-tuned concept's
    word (`studio train --init-from-encoder`), whose vectors stand where the token is written instead of
    `prompt_text`."""

    token: str
    embeds: torch.Tensor
    negative: torch.Tensor
    adapter: str
    adapter_sha256: str = ""
    encoder_dims: dict[str, int] = field(default_factory=dict)  # the text encoders' widths of the model it is for
    prompt_text: str = ""  # what stands in the prompt where the token is written
    meta: dict[str, str] = field(default_factory=dict)
    path: Path | None = None  # the file it was read from (an adapter named relative to it is found beside it)
    word: Concept | None = None  # quick-tuning's word trained beside the pictures (same token), or None

    def __post_init__(self) -> None:
        try:
            check_word(self.token, "image concept word")
        except WordError as exc:
            raise ImagePromptError(f"{exc} (encode again with another --token)") from None
        if self.embeds.dim() not in (2, 3) or self.embeds.shape[0] < 1 or not self.embeds.is_floating_point():
            raise ImagePromptError(f"image concept {self.token!r}: embeddings must be a float [pictures, dim] or "
                                   f"[pictures, tokens, width] tensor, not {list(self.embeds.shape)}; encode it again")
        if self.negative.shape != self.embeds.shape:
            raise ImagePromptError(f"image concept {self.token!r}: negative embeddings {list(self.negative.shape)} "
                                   f"differ from its embeddings {list(self.embeds.shape)}; encode it again")
        if self.word is not None and self.word.token != self.token:
            raise ImagePromptError(f"image concept {self.token!r}: its word is {self.word.token!r}; the two must be "
                                   "one token (train it again)")
        self.meta = {str(k): str(v) for k, v in self.meta.items()}

    @property
    def pictures(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def plus(self) -> bool:
        """Whether its adapter reads hidden states (IP-Adapter Plus) rather than projected embeddings."""
        return self.embeds.dim() == 3

    # ---- a learned thing (`studio.engine.learned.plan.Learned`) ----
    tag = None  # named by its token in the prompt's text, like a word

    @property
    def kind(self) -> str:
        return IMAGE_CONCEPT_KIND

    @property
    def name(self) -> str:
        return self.token

    def check_fit(self, encoder_dims: dict[str, int], model_name: str = "", where: str = "") -> None:
        """Raise `ConceptMismatchError` unless it was encoded for a model with these text encoder widths (its
        adapter was made for that family's UNet; the adapter's own layers are checked when it is loaded)."""
        if self.encoder_dims and dict(self.encoder_dims) != dict(encoder_dims):
            model = f"the model {model_name}" if model_name else "this model"
            raise ConceptMismatchError(
                f"{where or self.token}: image concept for a model with text encoders {self.encoder_dims}, but "
                f"{model} has {dict(encoder_dims)}; encode the pictures again with this model (studio encode)")
        if self.word is not None:
            check_fits(self.word, encoder_dims, where=where or self.token)

    def join(self, plan, weight: float = 1.0) -> None:
        """Its token, in the prompt and the negative prompt, becomes `prompt_text` (or, quick-tuned, its word's
        vectors); at a weight other than 0 its adapter is patched into the shared UNet for the request and its
        embeddings passed to the pipeline. The weight is the adapter's scale only: the word stays at any weight."""
        if self.word is not None:
            self.word.join(plan, 1.0)
        else:
            plan.prompt = replace_word(plan.prompt, self.token, self.prompt_text)
            plan.negative_prompt = replace_word(plan.negative_prompt, self.token, self.prompt_text)
        if weight == 0:
            return
        plan.patch(image_prompts_applied, self, weight)
        plan.add_arguments(EMBEDS_ARGUMENT, lambda model, guidance: {
            EMBEDS_ARGUMENT: embeds_arguments(plan.patched(image_prompts_applied), model, guidance)})


def replace_word(prompt: str, token: str, text: str) -> str:
    """`prompt` with every place `token` is written as a word (the rule that places words, `split_concept_words`)
    replaced by `text`; with no `text`, the spaces either side of the word become one."""
    texts = split_concept_words(prompt, {token: token}.get)[::2]  # text, word, text, ...: the texts
    if text or len(texts) == 1:
        return text.join(texts)
    out = texts[0]
    for right in texts[1:]:
        left, right = out.rstrip(), right.lstrip()
        out = left + (" " if left and right and right[0] not in ",.;:!?)]" else "") + right
    return out


def embeds_arguments(uses: list[tuple], model, guidance: float) -> list[torch.Tensor]:
    """The pipeline's `ip_adapter_image_embeds`: per concept (in the order of the UNet's image projections) its
    pictures as one image prompt, `[2, n, ...]` negative first when the pipeline guides, else `[1, n, ...]`. In the
    model's device and dtype (`model.dtype` is its UNet's: asking the UNet walks all its modules, ~1 ms)."""
    denoiser = model.denoiser
    guided = guidance > 1 and getattr(denoiser.config, "time_cond_proj_dim", None) is None  # the pipelines' test
    out = []
    for concept, _weight in uses:
        rows = [concept.negative[None], concept.embeds[None]] if guided else [concept.embeds[None]]
        out.append(torch.cat(rows).to(device=model.device, dtype=model.dtype))
    return out


def infotext_value(uses: list[tuple]) -> str:
    """The infotext value (`INFOTEXT_KEY`) of a request's `(image concept, weight)` pairs: each one's token, weight,
    adapter (its file's stem: no folder of this machine goes into a picture) and the first 12 digits of the
    adapter's digest, which tells two adapters of one name apart."""
    items = []
    for concept, weight in uses:
        digest = f" [{concept.adapter_sha256[:12]}]" if concept.adapter_sha256 else ""
        items.append(f"{concept.token}: {float(weight):g} {Path(concept.adapter).stem}{digest}")
    return '"' + ", ".join(items) + '"'


def read_infotext_value(value: str) -> dict[str, float]:
    """Token -> weight from an `infotext_value` (quotes already taken off)."""
    return {match[1]: float(match[2]) for match in _INFOTEXT_ITEM.finditer(value)}

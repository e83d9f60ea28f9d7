"""What every learned thing of a request adds to it, collected in one plan, then entered around the pipeline call.

A learned thing (a word, a per-layer word, a LoRA file; next a Perfusion edit or an image prompt) has a `kind`, a
`name`, a fit check against a model's text encoder widths (`check_fit`: the one rule requests and the library's
listing both ask), the extra-networks tag that names it in a prompt
(`tag`: "lora" for `<lora:name:w>`, None for words), and `join(plan, weight)`, which says what it adds:

- prompt slots: words whose vectors stand in the prompt (`RequestPlan.add_words`);
- how the prompt is encoded (`RequestPlan.encode`: per-layer words encode one prompt per cross-attention layer);
- attention edits on the shared denoiser's attention processors (`RequestPlan.edit_attention`: per-layer words now);
- module patches on the shared denoiser and text encoders (`RequestPlan.patch`: peft adapters of LoRA files,
  IP-Adapter processors and image projections of image concepts);
- pipeline arguments besides the prompt's (`RequestPlan.add_arguments`: image concepts' `ip_adapter_image_embeds`).

Generation is then: build the plan (`plan_request`), enter its patches, encode the prompt, enter its attention
edits, call the pipeline, all in one `ExitStack` (`studio.engine.generate.generate`). Whatever a plan changes on the
shared modules is undone when the stack closes, so nothing of one request reaches the next.

    plan = plan_request(prompt, negative_prompt, [Use(word, 1.0), Use(lora, 0.8)])
    with ExitStack() as stack:
        plan.enter_patches(model, stack)
        kwargs = plan.prompt_kwargs(model, denoiser, batch=1, guidance=7.5)
        plan.enter_attention(denoiser, stack)
        images = pipe(**kwargs, ...).images
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Protocol, runtime_checkable

from studio.engine.prompts import split_lora_tags
from studio.errors import LoraError

# (patch entering function) -> called as enter(model, [(thing, weight), ...]), a context manager for the block
PatchEnter = Callable[[object, list], AbstractContextManager]
# (denoiser) -> a context manager that changes its attention processors for the block
AttentionEnter = Callable[[object], AbstractContextManager]
# (prompt encoder, denoiser, prompt, negative prompt, words, batch, guidance) -> pipeline keyword arguments
Encode = Callable[..., dict]
# (model, guidance) -> more pipeline keyword arguments (image prompts' `ip_adapter_image_embeds`)
Arguments = Callable[[object, float], dict]


@runtime_checkable
class Learned(Protocol):
    """The protocol every kind of learned thing follows (`Concept`, `XtiConcept`, `LoraFile`)."""

    @property
    def kind(self) -> str: ...  # what it is, in a word the UI shows: "word", "per-layer word", "lora", ...

    @property
    def name(self) -> str: ...  # what names it: a word's token, a LoRA's file stem

    tag: str | None  # the extra-networks tag that names it in a prompt (`<lora:name:w>`: "lora"), or None

    def check_fit(self, encoder_dims: dict[str, int], model_name: str = "", where: str = "") -> None: ...
    # ^ raise a UserError that says why it does not fit a model with these text encoder widths (`model_name`)

    def join(self, plan: RequestPlan, weight: float) -> None: ...  # add what it needs to a request's plan


class Use(NamedTuple):
    """A learned thing with the weight a request uses it at (1.0: as learned; A1111's default LoRA weight)."""

    thing: Learned
    weight: float = 1.0


def uses_of(items: Iterable) -> list[Use]:
    """Each item as a `Use`: a learned thing alone (weight 1.0) or `(thing, weight)`; the same thing (the same
    object) named twice is used once, at its first weight."""
    found: list[Use] = []
    for item in items:
        thing, weight = item if isinstance(item, tuple) else (item, 1.0)
        if not any(thing is known.thing for known in found):
            found.append(Use(thing, float(weight)))
    return found


def _plain_encode(encoder, _denoiser, prompt: str, negative_prompt: str, words: list, batch: int,
                  guidance: float) -> dict:
    return encoder.pipeline_kwargs(prompt, negative_prompt, words, batch, guidance)


@dataclass
class RequestPlan:
    """What a request's learned things add to it. `prompt` is the prompt without its extra-networks tags."""

    prompt: str
    negative_prompt: str = ""
    tags: list[tuple[str, float]] = field(default_factory=list)  # (name, weight) of each `<lora:name:w>`, in order
    words: list = field(default_factory=list)  # prompt slots: every word's vectors, the request's own first
    encode: Encode = _plain_encode
    attention: dict[str, AttentionEnter] = field(default_factory=dict)  # one entry per kind of edit
    patches: dict[PatchEnter, list[Use]] = field(default_factory=dict)  # per way of patching, what it applies
    arguments: dict[str, Arguments] = field(default_factory=dict)  # pipeline arguments besides the prompt's

    def add_words(self, words: Iterable) -> None:
        """Prompt slots for `words` (each once)."""
        self.words.extend(w for w in words if not any(w is known for known in self.words))

    def edit_attention(self, key: str, enter: AttentionEnter) -> None:
        """Change the denoiser's attention processors with `enter(denoiser)` for the block (once per `key`)."""
        self.attention.setdefault(key, enter)

    def patch(self, enter: PatchEnter, thing: Learned, weight: float) -> None:
        """Apply `thing` at `weight` to the shared modules with `enter(model, uses)`, all of one `enter` at once."""
        self.patches.setdefault(enter, []).append(Use(thing, weight))

    def add_arguments(self, key: str, make: Arguments) -> None:
        """Pass `make(model, guidance)`'s keyword arguments to the pipeline too (once per `key`)."""
        self.arguments.setdefault(key, make)

    def patched(self, enter: PatchEnter) -> list[tuple]:
        """The (thing, weight) pairs patched in with `enter`."""
        return [tuple(use) for use in self.patches.get(enter, [])]

    def enter_patches(self, model, stack: ExitStack) -> None:
        """Patch the shared modules for the rest of `stack` (the prompt's encoding and the denoising both: a LoRA's
        text-encoder part changes the prompt embeddings)."""
        for enter, uses in self.patches.items():
            stack.enter_context(enter(model, [tuple(use) for use in uses]))

    def prompt_kwargs(self, model, denoiser, batch: int, guidance: float) -> dict:
        """The pipeline's prompt arguments: embeddings with every word's vectors in its slots (per layer for
        per-layer words), and the arguments learned things add (`add_arguments`). Raises `ConceptMismatchError`
        for a word that does not fit the model."""
        kwargs = self.encode(model.encoder, denoiser, self.prompt, self.negative_prompt, self.words, batch, guidance)
        for make in self.arguments.values():
            kwargs.update(make(model, guidance))
        return kwargs

    def enter_attention(self, denoiser, stack: ExitStack) -> None:
        """Change the shared denoiser's attention processors for the rest of `stack`."""
        for enter in self.attention.values():
            stack.enter_context(enter(denoiser))


def plan_request(prompt: str, negative_prompt: str, uses: Iterable[Use]) -> RequestPlan:
    """The plan of a request: its prompt parsed once (`<lora:name:w>` tags taken out, their weights given to the
    things they name) and what each learned thing adds. A tag that names none of the request's things is refused
    in one line."""
    text, tags = split_lora_tags(prompt)
    plan = RequestPlan(text, negative_prompt, tags)
    uses = list(uses)
    tagged = dict(tags)
    named = {(use.thing.tag, use.thing.name) for use in uses if use.thing.tag}
    for name, _weight in tags:
        if ("lora", name) not in named:
            given = sorted(n for tag, n in named if tag == "lora")
            listed = f" ({', '.join(given)})" if given else ""
            raise LoraError(f"<lora:{name}> in the prompt names no LoRA of this request{listed}; add "
                            f"{name}.safetensors to its LoRAs or take the tag out")
    for use in uses:
        weight = tagged.get(use.thing.name, use.weight) if use.thing.tag == "lora" else use.weight
        use.thing.join(plan, weight)
    return plan

"""Perfusion (Tewel et al., SIGGRAPH 2023, "Key-Locked Rank One Editing for Text-to-Image Personalization"), at run time.

A Perfusion concept (`PerfusionConcept`) is a word and a gated rank-one edit of every cross-attention key and value
projection of the UNet. With `e` a text encoding at one prompt position (the cross-attention input), `i*` the
concept's target input (the running mean of its word's encoding in training) and `C` the uncentered covariance of
text encodings over a caption set, each projection `W` becomes

    W'(e) = W e - s(e) W i* + sigmoid((s(e) - beta) / tau) o*,      s(e) = e^T C^-1 i* / (i*^T C^-1 i*)

Keys: `o*_K = W_K i_class`, the class word's encoding through the key projection (the "key lock": the concept's key
is its class's, so it is attended where its class would be). Values: `o*_V` learned. `beta`/`tau` are the gate's
threshold and softness (training 0.75/0.1; at inference 0.6-0.75 locks locally, 0.4-0.6 globally, tau 0.15).

Several concepts in one prompt: the rank-n form of the same update (the paper's closed form for several edits),
`s(e) = G^-1 (I^T C^-1 e)` with `G = I^T C^-1 I`, so each concept's term sees its own target and not the others'.
A file holds `C^-1 i*` beside `i*` (`target_metric`), so no covariance is needed at run time.

Per request (`PerfusionConcept.join`): the word stands in the prompt's slots like any word, and when the prompt names
it, an attention edit wraps each cross-attention layer's `to_k`/`to_v` for the length of the request
(`perfusion_edited`; whatever was there, a peft LoRA layer included, is called as it was and put back in
`finally`). A prompt that does not name the word gets no edit: its pictures are the base model's bit for bit. Files:
`studio.engine.learned.perfusion_files`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

from studio.engine.learned.layer_word import cross_attention_layers
from studio.engine.learned.word import Concept, ConceptError, ConceptMismatchError

# The paper's gate (section 4 and its supplement): training threshold and softness, and the inference defaults
# ("local lock": beta 0.6-0.75; "global": 0.4-0.6; tau 0.15).
TRAIN_BETA, TRAIN_TAU = 0.75, 0.1
INFERENCE_BETA, INFERENCE_TAU = 0.7, 0.15
# The demo model's files lock tighter: on 6 held-out individuals (seed 23, docs/benchmarks.md "Perfusion") beta 0.7
# gave prompt fidelity 0.13 below TI's, 0.95 0.03 below at the same identity (0.46).
DEMO_BETA = 0.95
EDIT_KEY = "perfusion"  # the plan's attention-edit entry that collects a request's Perfusion concepts


# ---- the concept --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class PerfusionConcept(Concept):
    """A word (`vectors`, as for any `Concept`) and the gated rank-one edit of each cross-attention layer.

    `target` is i* and `target_metric` C^-1 i* (both `[D]`, D the UNet's cross-attention width); `keys` and `values`
    hold o*_K and o*_V per layer of `layers` (the UNet's cross-attention modules in forward order). `beta` and `tau`
    are the gate a request uses (`with_gate` gives a copy with others); `class_word` is what the keys are locked to."""

    layers: list[str] = field(default_factory=list)
    target: torch.Tensor | None = None
    target_metric: torch.Tensor | None = None
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    class_word: str = ""
    beta: float = INFERENCE_BETA
    tau: float = INFERENCE_TAU

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers or not len(self.layers) == len(self.keys) == len(self.values):
            raise ConceptError(f"Perfusion concept {self.token!r}: {len(self.layers)} layers for {len(self.keys)} "
                               f"keys and {len(self.values)} values; give one key and one value per layer")
        for name, tensor in (("target", self.target), ("target_metric", self.target_metric)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or not tensor.is_floating_point():
                raise ConceptError(f"Perfusion concept {self.token!r}: {name} must be a 1-D float tensor")
        if self.target.shape != self.target_metric.shape:
            raise ConceptError(f"Perfusion concept {self.token!r}: target {list(self.target.shape)} and its metric "
                               f"{list(self.target_metric.shape)} differ in width")
        for layer, key, value in zip(self.layers, self.keys, self.values):
            if key.dim() != 1 or key.shape != value.shape:
                raise ConceptError(f"Perfusion concept {self.token!r}: layer {layer} has a key of "
                                   f"{list(key.shape)} and a value of {list(value.shape)}; both must be [width]")
        if not (0.0 < self.tau <= 10.0 and -10.0 <= self.beta <= 10.0):
            raise ConceptError(f"Perfusion concept {self.token!r}: gate beta {self.beta}, tau {self.tau}; use tau in "
                               "(0, 10] (0.15 at inference) and beta in [-10, 10] (0.4-0.75)")

    @property
    def kind(self) -> str:
        return "perfusion"

    @property
    def width(self) -> int:
        """D: the cross-attention input width the edit was made for (SD 1.x 768, SDXL 2048, the demo model 128)."""
        return int(self.target.shape[0])

    def with_gate(self, beta: float | None = None, tau: float | None = None) -> "PerfusionConcept":
        """The same concept (its tensors shared) with another gate for a request: beta 0.6-0.75 locks the concept
        locally, 0.4-0.6 globally (the paper's ranges); None keeps the concept's own."""
        return replace(self, beta=self.beta if beta is None else float(beta),
                       tau=self.tau if tau is None else float(tau))

    def join(self, plan, weight: float = 1.0) -> None:
        """Its word in the prompt's slots; when the prompt names it, its edit of every cross-attention layer (all
        of a request's Perfusion concepts in one edit, `PerfusionEdits`)."""
        from studio.engine.prompts import split_concept_words

        plan.add_words([self])
        named = any(part is self for text in (plan.prompt, plan.negative_prompt)
                    for part in split_concept_words(text, {self.token: self}.get, longest=len(self.token)))
        if not named or weight == 0:
            return
        edits = plan.attention.get(EDIT_KEY)
        if edits is None:
            edits = PerfusionEdits()
            plan.edit_attention(EDIT_KEY, edits)
        edits.uses.append((self, float(weight)))


def with_gate(items, beta: float | None = None, tau: float | None = None) -> list:
    """A request's learned things (each alone or `(thing, weight)`) with every Perfusion concept's gate set to
    `beta`/`tau` where given (`PerfusionConcept.with_gate`); the others as they are."""
    def gated(item):
        thing, weight = item if isinstance(item, tuple) else (item, None)
        if isinstance(thing, PerfusionConcept):
            thing = thing.with_gate(beta, tau)
        return thing if weight is None else (thing, weight)
    return [gated(item) for item in items]


# ---- the edit -----------------------------------------------------------------------------------------------------
class GatedRankOne(torch.nn.Module):
    """A cross-attention key or value projection with the gated rank-one edits of one or more concepts.

    `inner` is the projection that was there (a Linear, or peft's LoRA layer around one: the edit is added to
    whatever it computes). Per concept: `targets` its i* `[D]`, `metrics` its C^-1 i* `[D]`, `outputs` its o* for
    this projection `[out]`, and `gates` its (beta, tau, weight). Tensors are kept by reference and stacked at each
    call: the trainer updates i* in place and learns o*_V through them."""

    def __init__(self, inner: torch.nn.Module, targets: Sequence[torch.Tensor], metrics: Sequence[torch.Tensor],
                 outputs: Sequence[torch.Tensor], gates: Sequence[tuple[float, float, float]]):
        super().__init__()
        self.inner = inner
        self.targets, self.metrics, self.outputs = list(targets), list(metrics), list(outputs)
        self.beta, self.tau, self.weight = (torch.tensor(column, dtype=torch.float32) for column in zip(*gates))

    def forward(self, encoding: torch.Tensor) -> torch.Tensor:
        out = self.inner(encoding)
        device = encoding.device
        targets = torch.stack(self.targets).to(device, torch.float32)  # [n, D]
        metrics = torch.stack(self.metrics).to(device, torch.float32)  # [n, D]
        outputs = torch.stack(self.outputs).to(device, torch.float32)  # [n, out]
        # s(e) = G^-1 (I^T C^-1 e): each concept's share of e, orthogonal to the others' targets (n = 1: the paper's
        # e^T C^-1 i* / i*^T C^-1 i*).
        gram = targets @ metrics.T  # [n, n]: i_a^T C^-1 i_b
        projected = encoding.float() @ metrics.T  # [..., n]
        shares = torch.linalg.solve(gram, projected.reshape(-1, projected.shape[-1]).T).T.reshape(projected.shape)
        # W i*, with whatever LoRA the projection carries (less its bias: the edit is of the linear map alone)
        rows = self.inner(torch.cat([targets, targets[:1] * 0]).to(out.dtype)).float()
        through = rows[:-1] - rows[-1:]
        beta, tau, weight = self.beta.to(device), self.tau.to(device), self.weight.to(device)
        gate = torch.sigmoid((shares - beta) / tau)
        edit = (gate * weight) @ outputs - (shares * weight) @ through
        return out + edit.to(out.dtype)


@dataclass
class PerfusionEdits:
    """A request's Perfusion concepts and their weights; called with the denoiser, the context manager that edits
    its cross-attention layers for the request (`perfusion_edited`)."""

    uses: list[tuple[PerfusionConcept, float]] = field(default_factory=list)

    def __call__(self, denoiser):
        return perfusion_edited(denoiser, self.uses)


def check_layers_fit(concept: PerfusionConcept, denoiser, layers: Sequence[str]) -> None:
    """Raise `ConceptMismatchError` unless `concept` edits exactly these cross-attention `layers` at their widths."""
    origin = concept.meta.get("source_path") or concept.token
    trained = concept.meta.get("base_model") or "another model"
    if list(concept.layers) != list(layers):
        raise ConceptMismatchError(f"{origin}: Perfusion concept {concept.token!r} was trained on {trained} and edits "
                                   f"{len(concept.layers)} cross-attention layers; this model's UNet has "
                                   f"{len(layers)} others; load the model it was trained on, or train it on this one "
                                   "(studio train --method perfusion)")
    for layer, key in zip(layers, concept.keys):
        attention = denoiser.get_submodule(layer)
        width = attention.cross_attention_dim
        if width != concept.width or attention.inner_kv_dim != key.shape[0]:
            raise ConceptMismatchError(f"{origin}: Perfusion concept {concept.token!r} edits {layer} at "
                                       f"{concept.width} -> {key.shape[0]}, this model's is {width} -> "
                                       f"{attention.inner_kv_dim}; load the model it was trained on ({trained})")


def edit_projections(denoiser, layers: Sequence[str], concepts: Sequence[PerfusionConcept],
                     weights: Sequence[float]) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Wrap each layer's `to_k`/`to_v` in a `GatedRankOne` of `concepts` (their tensors by reference); returns
    (attention, name, original) for each projection replaced, for `restore_projections`."""
    gates = [(c.beta, c.tau, float(w)) for c, w in zip(concepts, weights)]
    targets, metrics = [c.target for c in concepts], [c.target_metric for c in concepts]
    replaced = []
    for index, layer in enumerate(layers):
        attention = denoiser.get_submodule(layer)
        for name, outputs in (("to_k", [c.keys[index] for c in concepts]), ("to_v", [c.values[index] for c in concepts])):
            original = getattr(attention, name)
            setattr(attention, name, GatedRankOne(original, targets, metrics, outputs, gates))
            replaced.append((attention, name, original))
    return replaced


def restore_projections(replaced: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    """Put back what `edit_projections` replaced."""
    for attention, name, original in reversed(replaced):
        setattr(attention, name, original)


@contextmanager
def perfusion_edited(denoiser, uses: Sequence[tuple[PerfusionConcept, float]]) -> Iterator[None]:
    """For the length of the block, the cross-attention keys and values of `denoiser` carry the edits of `uses`
    ((concept, weight) pairs; weight 1: as learned, 0: off); put back in `finally`. Hold the model's lock (generate
    does): the denoiser is shared."""
    uses = [(c, w) for c, w in uses if w != 0]
    if not uses:
        yield
        return
    layers = cross_attention_layers(denoiser)
    for concept, _weight in uses:
        check_layers_fit(concept, denoiser, layers)
    replaced = edit_projections(denoiser, layers, [c for c, _ in uses], [w for _, w in uses])
    try:
        yield
    finally:
        restore_projections(replaced)


# ---- the covariance -----------------------------------------------------------------------------------------------
def encoding_covariance(encoder, captions: Sequence[str], batch: int = 32) -> torch.Tensor:
    """C: the uncentered covariance `[D, D]` of the text encodings (every position, as cross-attention sees them) of
    `captions` through the prompt encoder (`studio.engine.prompts.PromptEncoder`), in float64."""
    total, count = None, 0
    with torch.no_grad():
        for start in range(0, len(captions), batch):
            embeds = encoder.encode(list(captions[start:start + batch]), []).embeds
            flat = embeds.reshape(-1, embeds.shape[-1]).double().cpu()
            total = flat.T @ flat if total is None else total + flat.T @ flat
            count += flat.shape[0]
    if total is None:
        raise ConceptError("no captions to measure the text encodings' covariance on; give a caption file")
    return total / count


def inverse_covariance(covariance: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """C^-1 `[D, D]` (float32), with a ridge of `ridge` x the mean eigenvalue so that directions no caption spans
    stay finite."""
    d = covariance.shape[0]
    regular = covariance + ridge * covariance.diagonal().mean() * torch.eye(d, dtype=covariance.dtype)
    # contiguous: linalg.inv answers in column-major strides, and a product's rounding follows the strides (a run
    # that measured C^-1 must continue bit for bit as one that read it back from the cache)
    return torch.linalg.inv(regular).float().contiguous()

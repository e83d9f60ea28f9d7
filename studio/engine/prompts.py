"""Prompt text + the concepts active for this request -> prompt embeddings for the diffusers pipelines.

Concepts are per-request data. The shared tokenizer and embedding table are never changed: the prompt is split
at each concept's token, the plain text between is tokenized as usual, and each concept occurrence becomes
`n_vectors` slots whose input embeddings are the concept's vectors. The text transformer then runs from those
input embeddings. So two users of one server never see each other's words, a swap costs nothing, and the trainer
uses this very path (gradients reach the concept vectors, and nothing else).

The result equals what a pipeline produces after diffusers' `load_textual_inversion` for the same file
(tests/engine/test_prompts.py). One deliberate difference: transformers pools SDXL's second encoder at
`argmax(input_ids)` when a config carries the legacy `eos_token_id == 2`; after `load_textual_inversion` that
lands on the added token rather than the end of the prompt. We always pool at the real end-of-text position.

Prompt weighting follows AUTOMATIC1111: `(word:1.3)`, `(word)` = x1.1, `[word]` = /1.1, `\\(` for a literal
bracket (`parse_prompt_weights`). Each token's final hidden state is multiplied by its weight, then the whole
embedding is rescaled so its mean equals the unweighted mean (A1111's "Original" emphasis). A concept token takes the
weight of the text around it, on every one of its vectors. compel was considered and not used: it reads
`(word)1.3` / `word++` rather than A1111's syntax, weights by interpolating from the empty prompt rather than
A1111's scale-and-rescale, and runs the text encoder from token ids, so concepts would have to be added to the
shared tokenizer and embedding table. A prompt without weighting syntax encodes exactly as before.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from studio.engine.families import ENCODER_KEYS, FAMILIES, detect_family, dropped_encoders, encoder_width, encoders_of
from studio.engine.learned.word import Concept, check_fits
from studio.engine.names import MAX_WORD_CHARS
from studio.errors import UserError

log = logging.getLogger(__name__)


# ---- concept words -----------------------------------------------------------------------------------------------
# A concept's word counts where it stands whole: the characters on either side of it are none of these (letters,
# digits, _ and the < > - that words like <cat-toy> are made of). So "<cat-toy>.", "(<cat-toy>:1.2)" and
# "[style_x|dog]" name their concepts, "<cat-toy>s" and "bad-hands-55" do not. A word holds no whitespace
# (studio.engine.names.check_word).
_WORD_CHAR = re.compile(r"[\w<>\-]")


def split_concept_words(prompt: str, lookup: Callable[[str], Concept | None],
                        longest: int = MAX_WORD_CHARS) -> list[str | Concept]:
    """`prompt` as its plain text and the concepts its words name, in order (text first and last, possibly "").

    The one rule that finds concept words: the library uses it to tell which concepts a prompt uses, the encoder
    to place them. At each place a word can start, the longest candidate (at most `longest` characters) that ends
    where a word can end and that `lookup` knows wins; the search goes on after it."""
    parts: list[str | Concept] = []
    text_from, i = 0, 0
    while i < len(prompt):
        if prompt[i].isspace() or (i > 0 and _WORD_CHAR.match(prompt[i - 1])):
            i += 1
            continue
        chunk_end = i
        while chunk_end < len(prompt) and chunk_end - i < longest and not prompt[chunk_end].isspace():
            chunk_end += 1
        for end in range(chunk_end, i, -1):
            concept = None if end < len(prompt) and _WORD_CHAR.match(prompt[end]) else lookup(prompt[i:end])
            if concept is not None:
                parts += [prompt[text_from:i], concept]
                text_from = i = end
                break
        else:
            i += 1
    parts.append(prompt[text_from:])
    return parts



# ---- LoRA tags ---------------------------------------------------------------------------------------------------
# A1111's extra-networks syntax (modules/extra_networks.py): `<lora:name>` or `<lora:name:weight>`, the weight 1.0
# when left out. The tag is taken out of the text the encoder sees; the name is a LoRA file's stem.
_LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^<>]*))?>")


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """`prompt` without its `<lora:name:weight>` tags, and the (name, weight) of each tag in order.

    >>> split_lora_tags("a photo of <lora:pixel_art:0.8> a cat")
    ('a photo of a cat', [('pixel_art', 0.8)])

    A weight that is not a number raises `UserError` naming the tag."""
    tags = []
    for found in _LORA_TAG.finditer(prompt):
        name, weight = found[1].strip(), found[2]
        if weight is None:
            tags.append((name, 1.0))
            continue
        try:
            tags.append((name, float(weight)))
        except ValueError:
            raise UserError(f"{found[0]}: the LoRA weight {weight!r} is not a number; write <lora:{name}:0.8>, "
                              f"or <lora:{name}> for weight 1") from None
    if not tags:
        return prompt, []  # a prompt without tags reaches the encoder exactly as written
    text = _LORA_TAG.sub(" ", prompt)
    return re.sub(r"[ \t]{2,}", " ", text).strip(), tags


# ---- prompt weighting (A1111 syntax) ------------------------------------------------------------------------------
ROUND_BRACKET_MULTIPLIER = 1.1  # A1111 modules/prompt_parser.py: (word) = x1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1  # A1111: [word] = /1.1

# A1111's tokenizer for attention syntax (modules/prompt_parser.py `re_attention`), without BREAK: escapes,
# brackets, an explicit ":weight)" closer, runs of plain text, and a stray ":".
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) runs with AUTOMATIC1111's attention syntax.

    `(a:1.3)` multiplies by 1.3, `(a)` by 1.1, `[a]` by 1/1.1; brackets nest and multiply; an unclosed bracket
    runs to the end; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters. Adjacent runs of equal weight
    are merged, so a prompt with no syntax comes back whole: `[(text, 1.0)]`. `BREAK` is plain text here.

    >>> parse_prompt_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")  # A1111's own example
    [('a ', 1.0), ('house', 1.5730000000000004), (' ', 1.1), ('on', 1.0), (' a ', 1.1), ('hill', 0.55), (', sun, ', 1.1), ('sky', 1.4641000000000006), ('.', 1.1)]
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            run[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            try:
                value = float(weight)
            except ValueError:
                raise ValueError(f"prompt weight {weight!r} in {piece!r} is not a number; write it like (word:1.3)") from None
            multiply_from(round_open.pop(), value)
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_BRACKET_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            runs.append([piece, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)

    merged: list[list] = []
    for run in runs:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def apply_prompt_weights(embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token's hidden state by its weight, then restore the mean.

    `embeds` [B, T, D], `weights` [B, T]. The mean is restored per prompt (A1111 takes it over the whole batch,
    which is the same for one prompt); a prompt whose weights are all 1 comes back bit for bit.
    """
    original_mean = embeds.mean(dim=(1, 2), keepdim=True)
    weighted = embeds * weights.to(embeds.dtype).unsqueeze(-1)
    return weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))


@dataclass
class EncodedPrompt:
    embeds: torch.Tensor  # [B, 77, D]: what the pipeline takes as prompt_embeds ([B, 77 + T5's, 4096] for SD3)
    pooled: torch.Tensor | None  # SDXL, SD3, Flux: [B, P], the pipeline's pooled_prompt_embeds; None for SD 1.x/2.x


def _join_features(outputs: list, family: str) -> EncodedPrompt:
    """SD 1.x/2.x/SDXL: the encoders' widths side by side; SDXL's pooled projection from its second encoder."""
    embeds = torch.cat([o[0] for o in outputs], dim=-1) if len(outputs) > 1 else outputs[0][0]
    return EncodedPrompt(embeds, outputs[-1][1] if family == "sdxl" else None)


def _join_sd3(outputs: list, _family: str) -> EncodedPrompt:
    """SD3 (diffusers' StableDiffusion3Pipeline.encode_prompt): CLIP-L and CLIP-G side by side, zero-padded to T5's
    width, then T5's tokens after them; pooled: both CLIPs' projections side by side."""
    (clip_l, pooled_l), (clip_g, pooled_g), (t5, _) = outputs
    clip = torch.cat([clip_l, clip_g], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return EncodedPrompt(torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1))


def _join_flux(outputs: list, _family: str) -> EncodedPrompt:
    """Flux (diffusers' FluxPipeline.encode_prompt): T5's tokens; CLIP-L's pooled output."""
    (_, pooled), (t5, _) = outputs
    return EncodedPrompt(t5, pooled)


# ModelFamily.prompt_join -> how the encoders' (embeddings, pooled) outputs make the pipeline's prompt arguments
JOINS = {"features": _join_features, "sd3": _join_sd3, "flux": _join_flux}


def is_t5(text_encoder) -> bool:
    """Whether `text_encoder` is a T5 encoder (SD3's third, Flux's second) rather than a CLIP text model."""
    return getattr(text_encoder.config, "model_type", "") in ("t5", "umt5")


class PromptEncoder:
    """Encodes prompts with per-request concepts for SD 1.x / 2.x (one encoder), SDXL (two CLIPs), SD3 (two CLIPs
    and T5) or Flux (CLIP-L and T5). A word's vectors for T5 stand in T5's input embeddings the same way."""

    def __init__(self, tokenizers: list, text_encoders: list, family: str, force_zeros_for_empty_prompt: bool = True,
                 dropped: dict[str, int] | None = None):
        if len(tokenizers) != len(text_encoders) or not 1 <= len(text_encoders) <= len(ENCODER_KEYS):
            raise ValueError(f"PromptEncoder needs one tokenizer per text encoder, 1 to {len(ENCODER_KEYS)} of each")
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.family = family
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.spec = FAMILIES[family]
        # Encoders the pipeline was loaded without (SD3's T5, `families.dropped_encoders`) -> the width of the zero
        # embeddings that stand for their tokens.
        self.dropped = dict(dropped or {})

    @classmethod
    def from_pipeline(cls, pipe) -> "PromptEncoder":
        """The encoder for a diffusers pipeline of any family, sharing its modules."""
        encoders = encoders_of(pipe)
        force = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))  # SDXL's config; SD has none
        return cls([tok for _, tok, _ in encoders], [enc for _, _, enc in encoders], detect_family(pipe), force,
                   dropped_encoders(pipe))

    # ---- tokenization -------------------------------------------------------------------------------------------
    @staticmethod
    def _split(prompt: str, concepts: Sequence[Concept], key: str = "text_encoder") -> list[str | Concept]:
        """Split `prompt` into plain text and the occurrences of concepts with vectors for encoder `key`
        (`split_concept_words`); a word without them is plain text to that encoder (Flux's T5, words without T5)."""
        concepts = [c for c in concepts if key in c.vectors]
        if not concepts:
            return [prompt]
        by_token = {c.token: c for c in concepts}
        return split_concept_words(prompt, by_token.get, longest=max(map(len, by_token)))

    def _ids_and_slots(self, prompt: str, concepts: Sequence[Concept], tokenizer, weighting: bool = True,
                       key: str = "text_encoder", max_len: int | None = None,
                       ) -> tuple[list[int], list[tuple[int, Concept, int]], int, list[float]]:
        """Token ids padded to `max_len` (default: the tokenizer's), (position, concept, vector index) per concept
        slot, EOS position, and one prompt weight per position (1.0 for start, end and padding).

        A slot's id is a placeholder whose embedding is replaced; it is never EOS (CLIP's unknown token *is* EOS).
        T5 has no start token: its ids begin with the text."""
        start = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        placeholder = tokenizer.bos_token_id if start else tokenizer.unk_token_id
        max_len = max_len or tokenizer.model_max_length
        ids: list[int] = list(start)
        weights: list[float] = [1.0] * len(start)
        slots: list[tuple[int, Concept, int]] = []
        fragments = parse_prompt_weights(prompt) if weighting else [(prompt, 1.0)]
        for text, weight in fragments:
            for part in self._split(text, concepts, key):
                if isinstance(part, str):
                    if part.strip():
                        new_ids = tokenizer(part, add_special_tokens=False).input_ids
                        ids.extend(new_ids)
                        weights.extend([weight] * len(new_ids))
                else:
                    for k in range(part.n_vectors):
                        slots.append((len(ids), part, k))
                        ids.append(placeholder)
                        weights.append(weight)
        if len(ids) > max_len - 1:
            log.warning("prompt truncated to %d tokens (the encoder's limit): %d tokens cut", max_len,
                        len(ids) - (max_len - 1))
            ids, weights = ids[: max_len - 1], weights[: max_len - 1]
            slots = [s for s in slots if s[0] < max_len - 1]
        eos_position = len(ids)
        ids.append(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids.extend([pad] * (max_len - len(ids)))
        weights.extend([1.0] * (max_len - len(weights)))
        return ids, slots, eos_position, weights

    def slot_positions(self, prompt: str, concepts: Sequence[Concept], concept: Concept) -> list[int]:
        """The positions of `concept`'s slots in `prompt` (among `concepts`), as the first encoder places them: where
        its encoding is read (Perfusion's target follows it)."""
        _ids, slots, _eos, _weights = self._ids_and_slots(prompt, concepts, self.tokenizers[0])
        return [position for position, found, _k in slots if found is concept]

    # ---- encoding -----------------------------------------------------------------------------------------------
    @property
    def encoder_dims(self) -> dict[str, int]:
        """Encoder key -> input embedding width, e.g. `{"text_encoder": 768}`: what a concept's vectors must match
        (a dropped encoder's too, `families.encoder_dims`)."""
        return {**{key: encoder_width(te) for key, te in zip(ENCODER_KEYS, self.text_encoders)}, **self.dropped}

    def check_concepts(self, concepts: Sequence[Concept]) -> None:
        """Raise `ConceptMismatchError` (naming the file, its sizes, the model's and what to do) for a concept that
        does not fit this model's text encoders; a bare shape or key error would tell the user nothing."""
        dims = self.encoder_dims
        for concept in concepts:
            check_fits(concept, dims)

    def input_embeddings(self, index: int, prompts: list[str], concepts: Sequence[Concept] = (),
                         weighting: bool = True) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """The per-request step alone, for encoder `index`: token embeddings [B, 77, D] with each concept occurrence
        substituted into its slots, the EOS position of each prompt, and the prompt weights [B, 77].

        Out-of-place: the shared embedding table is untouched, and autograd reaches the concept vectors."""
        tokenizer, encoder = self.tokenizers[index], self.text_encoders[index]
        key = ENCODER_KEYS[index]
        table = encoder.get_input_embeddings()
        device, dtype = table.weight.device, table.weight.dtype
        length = self.spec.t5_tokens if is_t5(encoder) else None

        rows, eos_positions, weight_rows, all_slots = [], [], [], []
        for b, prompt in enumerate(prompts):
            ids, slots, eos_position, weights = self._ids_and_slots(prompt, concepts, tokenizer, weighting, key, length)
            rows.append(ids)
            eos_positions.append(eos_position)
            weight_rows.append(weights)
            all_slots.extend((b, pos, concept, k) for pos, concept, k in slots)
        inputs = table(torch.tensor(rows, device=device))
        if all_slots:
            batch_idx = torch.tensor([s[0] for s in all_slots], device=device)
            pos_idx = torch.tensor([s[1] for s in all_slots], device=device)
            values = torch.stack([s[2].vectors[key][s[3]].to(device=device, dtype=dtype) for s in all_slots])
            inputs = inputs.index_put((batch_idx, pos_idx), values)
        return inputs, eos_positions, torch.tensor(weight_rows, device=device)

    def _run_encoder(self, index: int, prompts: list[str], concepts: Sequence[Concept], clip_skip: int | None,
                     weighting: bool = True):
        inputs, eos_positions, weights = self.input_embeddings(index, prompts, concepts, weighting)
        return self.encode_input_embeddings(index, inputs, eos_positions, weights, clip_skip)

    def encode_input_embeddings(self, index: int, inputs: torch.Tensor, eos_positions: list[int],
                                weights: torch.Tensor, clip_skip: int | None = None):
        """Encoder `index` run from `input_embeddings`' output: (prompt embeddings [B, 77, D], pooled [B, P] or None).

        Apart from `input_embeddings` so that rows built with different concepts (one per UNet layer,
        `studio.engine.learned.layer_word`) go through the text transformer in one batch; each row is encoded on its own."""
        encoder = self.text_encoders[index]
        if is_t5(encoder):  # diffusers' SD3 and Flux pipelines run T5 without an attention mask; no pooled output
            embeds = encoder(inputs_embeds=inputs)[0]
            return (embeds if bool((weights == 1).all()) else apply_prompt_weights(embeds, weights)), None
        text_model = getattr(encoder, "text_model", encoder)  # CLIPTextModelWithProjection wraps a CLIPTextModel
        device = inputs.device

        hidden = text_model.embeddings(inputs_embeds=inputs)
        seq = hidden.shape[1]
        lowest = torch.finfo(hidden.dtype).min
        mask = torch.full((seq, seq), lowest, device=device, dtype=hidden.dtype).triu(1)
        mask = mask[None, None].expand(hidden.shape[0], 1, seq, seq)
        eos = torch.tensor(eos_positions, device=device)
        # diffusers' SD/SD2 encode_prompt hands the tokenizer's attention mask (padding hidden) to encoders whose
        # config sets `use_attention_mask`; its SDXL encode_prompt never does, so neither do we for SDXL.
        if self.family != "sdxl" and getattr(encoder.config, "use_attention_mask", False):
            padding = torch.arange(seq, device=device)[None, :] > eos[:, None]  # [B, seq]: after the EOS token
            mask = mask.masked_fill(padding[:, None, None, :], lowest)
        states = [hidden]
        for layer in text_model.encoder.layers:
            hidden = layer(hidden, mask)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            states.append(hidden)
        last = text_model.final_layer_norm(hidden)

        pooled = last[torch.arange(len(eos_positions), device=device), eos]  # CLIPTextModel's pooler_output (Flux)
        if hasattr(encoder, "text_projection"):
            pooled = encoder.text_projection(pooled)
        if self.spec.clip_hidden == "penultimate":  # SDXL, SD3: penultimate layer, no final norm
            embeds = states[-(clip_skip + 2)] if clip_skip else states[-2]
        elif clip_skip:
            embeds = text_model.final_layer_norm(states[-(clip_skip + 1)])
        else:
            embeds = last
        # Weights act on the output, as in A1111; the pooled projection stays that of the unweighted prompt.
        if not bool((weights == 1).all()):
            embeds = apply_prompt_weights(embeds, weights)
        return embeds, pooled

    def encode(self, prompts: list[str] | str, concepts: Sequence[Concept] = (), *, clip_skip: int | None = None,
               weighting: bool = True) -> EncodedPrompt:
        """Embeddings for `prompts` with `concepts` active; autograd flows into concept vectors that need it.

        `weighting=False` reads brackets and backslashes as plain text instead of A1111 prompt weights.
        Raises `ConceptMismatchError` when a concept was trained for another model family."""
        if isinstance(prompts, str):
            prompts = [prompts]
        self.check_concepts(concepts)
        return self._encode_checked(prompts, concepts, clip_skip, weighting)

    def _encode_checked(self, prompts: list[str], concepts: Sequence[Concept], clip_skip: int | None,
                        weighting: bool = True) -> EncodedPrompt:
        """`encode` for concepts already checked against this model (`check_concepts`)."""
        outputs = [self._run_encoder(i, prompts, concepts, clip_skip, weighting) for i in range(len(self.text_encoders))]
        like = outputs[0][0]  # diffusers makes a dropped T5's zeros in the first CLIP's dtype, on the same device
        outputs += [(like.new_zeros(len(prompts), self.spec.t5_tokens, width), None) for width in self.dropped.values()]
        return JOINS[self.spec.prompt_join](outputs, self.family)

    def zeros_for_negative(self, negative_prompt: str) -> bool:
        """Whether the negative embeddings are zeros rather than the encoded `negative_prompt`: SDXL's
        `force_zeros_for_empty_prompt` with no negative prompt, as diffusers' SDXL pipelines do."""
        return self.family == "sdxl" and not negative_prompt and self.force_zeros_for_empty_prompt

    def pipeline_kwargs(self, prompt: str, negative_prompt: str, concepts: Sequence[Concept] = (),
                        num_images: int = 1, guidance: float = 7.5, clip_skip: int | None = None) -> dict:
        """Keyword arguments for a StableDiffusion(XL) pipeline call: prompt (and negative) embeddings.

        Raises `ConceptMismatchError` when a concept does not fit this model: the one fit check of a generation."""
        self.check_concepts(concepts)
        if self.spec.guidance == "distilled":  # Flux: guidance is the transformer's input; no negative prompt
            with torch.no_grad():
                pos = self._encode_checked([prompt], concepts, clip_skip)
            return {"prompt_embeds": pos.embeds.repeat(num_images, 1, 1),
                    "pooled_prompt_embeds": pos.pooled.repeat(num_images, 1)}
        with torch.no_grad():
            pos = self._encode_checked([prompt], concepts, clip_skip)
            if self.zeros_for_negative(negative_prompt):
                neg = EncodedPrompt(torch.zeros_like(pos.embeds), torch.zeros_like(pos.pooled))
            else:
                neg = self._encode_checked([negative_prompt or ""], concepts, clip_skip)
        kwargs = {
            "prompt_embeds": pos.embeds.repeat(num_images, 1, 1),
            "negative_prompt_embeds": neg.embeds.repeat(num_images, 1, 1),
        }
        if pos.pooled is not None:
            kwargs["pooled_prompt_embeds"] = pos.pooled.repeat(num_images, 1)
            kwargs["negative_pooled_prompt_embeds"] = neg.pooled.repeat(num_images, 1)
        return kwargs

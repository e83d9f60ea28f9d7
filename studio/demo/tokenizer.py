"""Build a CLIP byte-level BPE tokenizer over a small, known vocabulary.

The demo model and the test fixtures cannot download `openai/clip-vit-large-patch14`'s tokenizer, so they make
their own: the 512 byte symbols that every CLIP vocabulary starts with, then, for each word of the given list, the
merges that build it up letter by letter. Any word is still tokenized (into bytes) and every listed word becomes a
single token, exactly as CLIP's own tokenizer behaves for common words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP byte-to-printable-character table (every byte gets a visible character)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges the way CLIP's tokenizer does: always the lowest-ranked adjacent pair first."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        ranked = [(r, i) for r, i in pairs if r is not None]
        if not ranked:
            break
        _, i = min(ranked)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def clip_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Return `(vocab, merges)` in the format of CLIP's `vocab.json` / `merges.txt`.

    Each word gets the merges that join what the earlier merges already make of it, left to right, until it is one
    token. BPE applies merges by rank, not by word, so a chain that ignored the earlier words' merges could be
    overtaken by them ("art" merged first would leave "heart" as "he" + "art")."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list: list[str] = symbols + [s + "</w>" for s in symbols]
    seen = set(vocab_list)
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    byte_map = _bytes_to_unicode()
    for word in sorted({w.lower() for w in words if w.strip()}):
        pieces = [byte_map[b] for b in word.encode("utf-8")]
        pieces[-1] += "</w>"
        while len(pieces := _bpe(pieces, ranks)) > 1:
            pair, merged = (pieces[0], pieces[1]), pieces[0] + pieces[1]
            ranks[pair] = len(merges)  # a new merge outranks every earlier one, so it applies last
            merges.append(" ".join(pair))
            if merged not in seen:
                seen.add(merged)
                vocab_list.append(merged)
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_clip_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write `vocab.json`, `merges.txt` and the tokenizer config to `out_dir` and load them back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(words)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    pairs = [tuple(m.split(" ")) for m in merges]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=model_max_length)
    tokenizer.save_pretrained(out)
    return CLIPTokenizer.from_pretrained(out)

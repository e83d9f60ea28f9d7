"""The demo tokenizer: every vocabulary word is one token, as CLIP's own tokenizer does for common words."""

from studio.demo.tokenizer import build_clip_tokenizer
from studio.demo.vocab import demo_words


def test_every_vocabulary_word_is_one_token(tmp_path):
    # "heart" after "art" is the case a merge chain built word by word got wrong: BPE merges by rank, so "art"'s
    # earlier merges used to leave "heart" as "he" + "art".
    words = demo_words(names=256) + ["art", "heart", "hearth", "he"]  # with the named individuals' names
    tokenizer = build_clip_tokenizer(words, tmp_path)
    split = {w: tokenizer.tokenize(w) for w in words if len(tokenizer.tokenize(w)) != 1}
    assert split == {}
    assert tokenizer.tokenize("a dotted cyan heart") == ["a</w>", "dotted</w>", "cyan</w>", "heart</w>"]


def test_unknown_words_still_tokenize_into_known_pieces(tmp_path):
    tokenizer = build_clip_tokenizer(["heart", "star"], tmp_path)
    pieces = tokenizer.tokenize("hearts")
    assert len(pieces) > 1 and "".join(pieces).replace("</w>", "") == "hearts"
    assert tokenizer.unk_token_id not in tokenizer("hearts stars", add_special_tokens=False).input_ids

"""The demo model's vocabulary: every word the world's captions use, plus common prompt words."""

from studio.demo.world import ATTRIBUTES, LOOK_CODE_WORD, LOOK_WORDS, UNNAMED, WORLD_V2, WorldOptions, individual_names

PROMPT_WORDS = (
    "a an the of in on and with two shapes picture photo painting rendering drawing style background left right top "
    "bottom center art by cute good bad blurry detailed object thing toy"
).split()


def demo_words(names: int = 0, options: WorldOptions = WORLD_V2) -> list[str]:
    """All words of the demo vocabulary, unnamed attribute values excluded (captions never use them), the names
    of the first `names` of `world.NAMED_INDIVIDUALS` (a build that draws them), and the words world v3's levers
    put in captions when `options` turns them on (`world.LOOK_WORDS`, `world.LOOK_CODE_WORD`)."""
    unnamed = {v for values in UNNAMED.values() for v in values}
    words = set(PROMPT_WORDS) | set(list(individual_names().values())[:names])
    for values in ATTRIBUTES.values():
        words.update(v for v in values if v not in unnamed)
    if options.look_words:
        words.update(LOOK_WORDS)
    if options.look_code:
        words.add(LOOK_CODE_WORD)
    return sorted(words)

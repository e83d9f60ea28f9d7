"""Does "two <w>" draw two objects on the demo model?

`python benchmarks/two_of_a_word.py --concept WORD.safetensors [--seeds 12] [--steps 20] [--plain "purple toys"]`

For seeds 0..N-1: "a <w> on a black background" and "two <w> on a black background" (the same seeds), each picture's
object count read by the demo judge (`studio.demo.judge`, count 1 or 2); prints, for each prompt, the share of
pictures read as two objects with a 95% bootstrap interval over pictures (`studio.evaluation.stats.bootstrap_mean`)
and the exact upper bound (the bootstrap interval is [0, 0] when no picture has two). A control in plain words
("two purple toys ...", `--plain`) and the captions' own phrasing of two objects ("a <w> and a <w> ...") say whether
the model draws two at all.
"""

from __future__ import annotations

import argparse

from studio.demo.judge import Judge
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.registry import load_concept
from studio.engine.models import ModelManager
from studio.evaluation.stats import bootstrap_mean


def clopper_pearson_high(k: int, n: int, level: float = 0.95) -> float:
    """The exact (Clopper-Pearson) upper end of a two-sided interval for k successes in n, by bisection: a bootstrap
    interval collapses to [0, 0] at 0/n."""
    from math import comb

    def tail(p: float) -> float:  # P(X <= k) for X ~ Binomial(n, p)
        return sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))

    if k >= n:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) > (1 - level) / 2 else (low, mid)
    return high


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", required=True, help="a learned word (.safetensors) for the demo model")
    parser.add_argument("--model", default=None, help="model folder (default: the built-in demo)")
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--plain", default="purple toys", help="a control in plain words: 'two PLAIN on ...'")
    args = parser.parse_args()
    model = ModelManager().load(args.model)
    concept = load_concept(args.concept)
    judge = Judge.load()
    w, plain = concept.token, args.plain
    prompts = [f"a {w} on a black background", f"two {w} on a black background"]
    prompts += [f"two {plain} on a black background"] if plain else []  # "two" in plain words
    prompts += [f"a {w} and a {w} on a black background"]  # the world's own phrasing of two objects
    for prompt in prompts:
        images = generate(model, GenerateRequest(prompt, "", [concept], seed=0, steps=args.steps,
                                                 batch=args.seeds, preview_every=0)).images
        twos = [1.0 if int(p["count"]) == 2 else 0.0 for p in judge.predict(images)]
        est = bootstrap_mean(twos)
        print(f"{prompt!r}: read as two objects {sum(twos):.0f}/{len(twos)} = {est.mean:.2f} "
              f"(95% bootstrap interval {est.low:.2f}-{est.high:.2f}, n={est.n}; exact upper bound "
              f"{clopper_pearson_high(int(sum(twos)), len(twos)):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

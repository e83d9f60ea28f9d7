"""A run's results (the dict `studio.evaluation.runner.run_evaluation` returns) as plain-text tables and as JSON."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def format_table(results: dict[str, Any]) -> str:
    """The results as plain-text tables."""
    lines = [f"model: {results['source']}  ({results['machine']})"]
    gap = results.get("conditioning_gap")
    if gap:
        lines.append(f"text conditioning: denoising loss {gap['loss_with_captions']:.4f} with captions vs "
                     f"{gap['loss_with_empty_prompt']:.4f} with empty prompts (relative gap {gap['relative_gap']:+.3f})")
    comp = results.get("compliance")
    if comp:
        lines.append(f"\nBase prompt compliance over {comp['prompts']} captions (share of named attributes shown):")
        lines.append("  " + "  ".join(f"{k} {v:.2f}" for k, v in comp["per_attribute"].items()))
        lines.append(f"  mean {comp['mean']:.2f}, every named attribute right {comp['all_named_right']:.2f}")
        if comp.get("chance_per_attribute"):
            lines.append("  chance (picture judged against another prompt): "
                         + "  ".join(f"{k} {v:.2f}" for k, v in comp["chance_per_attribute"].items())
                         + f"  mean {comp['chance_mean']:.2f}")
    concepts = results.get("concepts")
    if concepts:
        lines.append("\nTextual Inversion (default settings) vs the best plain prompt:")
        head = f"  {'concept':<18}{'kind':<8}{'recon TI':>9}{'plain':>7}{'gain':>7}{'edit TI':>9}{'plain':>7}{'train s':>9}"
        lines.append(head)
        for name, r in concepts.items():
            if "error" in r:
                lines.append(f"  {name:<18}{r['kind']:<8}not evaluated: {r['error']}")
                continue
            ti, pl = r["textual_inversion"], r["plain_prompt"]
            lines.append(f"  {name:<18}{r['kind']:<8}{ti['reconstruction']:>9.2f}{pl['reconstruction']:>7.2f}"
                         f"{r['reconstruction_gain']:>+7.2f}{ti['editability']:>9.2f}{pl['editability']:>7.2f}"
                         f"{r['train_seconds']:>9.0f}")
            if "color_spread" in ti:
                lines.append(f"    colour spread: TI {ti['color_spread']['distinct']} colours "
                             f"(entropy {ti['color_spread']['entropy']:.2f}) vs plain "
                             f"{pl['color_spread']['distinct']} ({pl['color_spread']['entropy']:.2f})")
    for name, r in results.get("style_transfer", {}).items():
        ti, pl = r["textual_inversion"], r["plain_prompt"]
        lines.append(f"\nStyle transfer {name} (img2img, strength {r['strength']}): style TI {ti['style_agreement']:.2f}"
                     f" / plain {pl['style_agreement']:.2f}; content kept TI {ti['content_kept']:.2f} / plain "
                     f"{pl['content_kept']:.2f}; success TI {ti['success']:.2f} / plain {pl['success']:.2f}")
    if results.get("composition"):
        lines.append("\nComposition (agreement / both present):")
        for name, r in results["composition"].items():
            ti, pl = r["textual_inversion"], r["plain_prompt"]
            lines.append(f"  {name:<40} TI {ti['agreement']:.2f} / {ti['both_present']:.2f}   "
                         f"plain {pl['agreement']:.2f} / {pl['both_present']:.2f}")
    lines.append(f"\n{results['seconds']:.0f}s in all")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> Path:
    """Write the results atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path

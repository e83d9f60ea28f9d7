"""A run's results (the dict `studio.evaluation.runner.run_evaluation` returns) as plain-text tables and as JSON.

Every score prints as `0.62 ± 0.04 (n=96)`: the mean, half the width of its 95% interval, and the pictures (or
captions) it rests on; a margin's interval that excludes 0 is marked `> 0` or `< 0`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from studio.evaluation.stats import Estimate


def _est(d: dict[str, Any] | None) -> str:
    """A score as `0.62 ± 0.04 (n=96)`; a margin signed (`+0.21 ± 0.06 (n=72)`); "-" when not measured."""
    if not d:
        return "-"
    return str(Estimate.from_dict(d))


def _margin(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    e = Estimate.from_dict(d)
    above = " > 0" if e.low > 0 else (" < 0" if e.high < 0 else "")
    return f"{e.mean:+.2f} ± {e.half_width:.2f} (n={e.n}){above}"


# Rows of a concept's table: JSON key, label. Identity rows appear where an identity scorer was given.
MEASURES = (("reconstruction", "reconstruction (judge: its attributes)"),
            ("identity", "identity (encoder: like its pictures)"),
            ("prompt_fidelity", "prompt fidelity (judge: the edit)"),
            ("identity_under_edits", "identity under edits"),
            ("attributes_under_edits", "its attributes under edits"))


def _score_rows(ti: dict[str, Any], plain: dict[str, Any], margins: dict[str, Any], indent: str) -> list[str]:
    lines = [f"{indent}{'':<40}{'with the word':<24}{'with plain words':<24}margin (word - plain)"]
    for key, label in MEASURES:
        if key in ti:
            lines.append(f"{indent}{label:<40}{_est(ti[key]):<24}{_est(plain.get(key)):<24}"
                         f"{_margin(margins.get(key))}")
    return lines


# The methods table (`studio eval --methods`, the Evaluate tab): one row per method.
METHOD_HEADERS = ["method", "identity", "prompt fidelity", "reconstruction", "identity − TI", "prompt fidelity − TI",
                  "file (mean)", "training (mean)"]


def method_rows(methods: dict[str, Any]) -> list[list[str]]:
    """Rows of METHOD_HEADERS: each method's pooled scores with their intervals, its margins over TI (paired; TI's
    own row has none) and its mean file size, training time and steps trained."""
    rows = []
    for name, m in methods.items():
        vs_ti = m.get("vs_ti", {})
        rows.append([name, _est(m.get("identity")), _est(m.get("prompt_fidelity")), _est(m.get("reconstruction")),
                     _margin(vs_ti.get("identity")), _margin(vs_ti.get("prompt_fidelity")),
                     _size(m.get("file_bytes")),
                     "-" if m.get("train_seconds") is None else
                     f"{m['train_seconds']:.{0 if m['train_seconds'] >= 10 else 2}f} s, "
                     f"{m['train_steps']:.0f} steps"])  # an encoder's time is a fraction of a second
    return rows


def _size(size_bytes: int | None) -> str:
    """A file size in KB below a megabyte, else in MB (decimal units, as file managers show them)."""
    if size_bytes is None:
        return "-"
    return f"{size_bytes / 1e3:.1f} KB" if size_bytes < 1e6 else f"{size_bytes / 1e6:.1f} MB"


def methods_table(methods: dict[str, Any], what: str = "Training methods") -> list[str]:
    """The rows of `method_rows` as aligned text lines under a heading saying what is compared, then the notes."""
    subjects = max((len(m["subjects"]) for m in methods.values()), default=0)
    lines = [f"\n{what} on the same sets (scores pooled over {subjects} object sets: subjects x prompts x "
             "pictures, 95% hierarchical bootstrap; file and training: mean over every set trained):"]
    rows = [METHOD_HEADERS, *method_rows(methods)]
    widths = [max(len(row[k]) for row in rows) + 2 for k in range(len(METHOD_HEADERS))]
    for row in rows:
        lines.append("  " + "".join(f"{cell:<{w}}" for cell, w in zip(row, widths)).rstrip())
    return lines + [f"  {note}" for note in method_notes(methods)]


def method_notes(methods: dict[str, Any]) -> list[str]:
    """A line for each set a method could not be trained or scored on, and why."""
    return [f"{name} on {set_name}: not evaluated: {r['error']}" for name, m in methods.items()
            for set_name, r in m["concepts"].items() if "error" in r]


def _conditioning_lines(results: dict[str, Any]) -> list[str]:
    """The model, the machine, and how much worse the model denoises without its captions."""
    lines = [f"model: {results['source']}  ({results['machine']})"]
    gap = results.get("conditioning_gap")
    if gap:
        lines.append(f"text conditioning: denoising loss {gap['loss_with_captions']:.4f} with captions vs "
                     f"{gap['loss_with_empty_prompt']:.4f} with empty prompts (relative gap {gap['relative_gap']:+.3f})")
    return lines


def _compliance_lines(comp: dict[str, Any] | None) -> list[str]:
    """The base model's prompt compliance per attribute and on average, beside chance; none when not measured."""
    if not comp:
        return []
    lines = [f"\nBase prompt compliance over {comp['prompts']} captions (share of named attributes shown; "
             "95% interval over captions):"]
    for key, est in comp.get("per_attribute_ci", {}).items():
        lines.append(f"  {key:<12}{_est(est)}")
    lines.append(f"  {'mean':<12}{_est(comp.get('mean_ci')) if comp.get('mean_ci') else round(comp['mean'], 2)}"
                 f"   every named attribute right {comp['all_named_right']:.2f}")
    if comp.get("chance_per_attribute"):
        lines.append("  chance (picture judged against another prompt): "
                     + "  ".join(f"{k} {v:.2f}" for k, v in comp["chance_per_attribute"].items())
                     + f"  mean {comp['chance_mean']:.2f}")
    return lines


def _pooled_lines(pooled_groups: dict[str, Any]) -> list[str]:
    """The concepts' scores pooled over the held-out subjects and over the given sets, each where there are any."""
    lines = []
    for group, label in (("held_out", "held-out subjects (objects no model has seen)"),
                         ("given", "given object sets")):
        pooled = pooled_groups.get(group)
        if not pooled:
            continue
        lines.append(f"\nPooled over {len(pooled['subjects'])} {label}: subjects x prompts x pictures, 95% "
                     "hierarchical bootstrap:")
        lines += _score_rows(pooled["textual_inversion"], pooled["plain_prompt"], pooled["margins"], "  ")
        if "ceiling" in pooled:
            lines.append(f"  {'real pictures (the ceiling)':<40}{_est(pooled['ceiling'])}")
            lines.append(f"  {'identity as a share of the ceiling':<40}{_est(pooled['identity_of_ceiling'])}")
    return lines


def _concept_lines(concepts: dict[str, Any] | None) -> list[str]:
    """Each concept's scores with its word against its best plain prompt, or why it was not evaluated."""
    if not concepts:
        return []
    lines = ["\nTextual Inversion (default settings) vs the best plain prompt, per concept:"]
    for name, r in concepts.items():
        if "error" in r:
            lines.append(f"  {name} ({r['kind']}): not evaluated: {r['error']}")
            continue
        ti, pl = r["textual_inversion"], r["plain_prompt"]
        lines.append(f"  {name} ({r['kind']}{', held out' if r.get('held_out') else ''}; plain words "
                     f"'{r['best_prompt']}'; trained {r['train_steps']} steps in {r['train_seconds']:.0f}s)")
        lines += _score_rows(ti, pl, r.get("margins", {}), "    ")
        if "ceiling" in r:
            lines.append(f"    {'real pictures (the ceiling)':<40}{_est(r['ceiling']['identity'])}")
        if "color_spread" in ti:
            lines.append(f"    colour spread: TI {ti['color_spread']['distinct']} colours "
                         f"(entropy {ti['color_spread']['entropy']:.2f}) vs plain "
                         f"{pl['color_spread']['distinct']} ({pl['color_spread']['entropy']:.2f})")
    return lines


def _style_and_composition_lines(results: dict[str, Any]) -> list[str]:
    """Style transfer per style concept, then composition per pair of learned words."""
    lines = []
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
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The results as plain-text tables: every score as `mean ± half-width of its 95% interval (n=pictures)`."""
    lines = _conditioning_lines(results) + _compliance_lines(results.get("compliance"))
    if "identity" in results and "error" in results["identity"]:
        lines.append(f"\nidentity not measured: {results['identity']['error']}")
    lines += _pooled_lines(results.get("pooled", {}))
    lines += _concept_lines(results.get("concepts"))
    lines += _style_and_composition_lines(results)
    if results.get("methods"):
        lines += methods_table(results["methods"])
    if results.get("variants"):
        lines += methods_table(results["variants"], "The paper's variants")
        if results.get("chart"):
            lines.append(f"  chart: {results['chart']}")
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

"""Evaluate tab: score a concept the way the Textual Inversion paper does and show the pictures the scores came from.

On the built-in demo model the judge checks the pictures against a bundled concept set's ground truth and the
identity encoder compares them with the training pictures; on any model a CLIP model (hub id or folder) gives
image-image and image-text similarity. Every score shows as `0.62 ± 0.04 (n=12)`: its 95% interval and the pictures
it rests on. The call is
`studio.evaluation.scoring.score_concept`; this file only adapts the form to it and the result to a table and a grid.

"Compare training methods" trains each method asked for (ti, pivotal, lora, dreambooth, ...) and each of the paper's
variants (multi3, progressive, regularized, per-image, ...: `studio.evaluation.runner.VARIANTS`) on bundled concept
sets and shows the methods table of `studio eval --methods` (`studio.evaluation.runner.compare_methods`, rows by
`studio.evaluation.report.method_rows`): identity and prompt fidelity with their intervals, file size, training time;
beside it the paper's reconstruction-editability chart of the same rows (`variants_chart`, as `studio eval --variants
--chart` draws it).
"""

from __future__ import annotations

import html
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
from PIL import Image, UnidentifiedImageError

from studio.demo.concept_sets import list_concept_sets, load_concept_set
from studio.demo.evaluate import DemoJudge, DemoWorld, concept_set_for
from studio.engine.generate import save_png
from studio.evaluation.clip import ClipScorer
from studio.evaluation.config import EvalConfig, ScoreConfig
from studio.evaluation.report import METHOD_HEADERS, method_notes, method_rows
from studio.evaluation.runner import VARIANTS, compare_methods, variants_chart
from studio.evaluation.scoring import ConceptScores, score_concept
from studio.evaluation.stats import Estimate
from studio.training.config import METHODS
from studio.ui.gpu import TRAIN_SECONDS, gpu_task
from studio.ui.operator import Operator
from studio.ui.pickers import ConceptPickers
from studio.ui.state import as_user_errors, Studio, user_error
from studio.ui.turns import GPU_EVENT, in_turn

HEADERS = ["measure", "with the word", "with plain words", "margin (word − plain)", "what it compares"]
AUTO, NONE = "auto (the set whose word it is)", "none"
EVALUATE_SECONDS = 300  # ZeroGPU time for one evaluation: 16 prompts x a few seeds on a real model
# The paper's variants that are no method of their own (a method's name is a variant too: those are in Methods).
PAPER_VARIANTS = tuple(v for v in VARIANTS if v not in METHODS and not v.endswith(("-all-steps", "-te")))  # those: benchmarks
# The CLIP models anyone may have an evaluation load: none, or the smaller of the paper's two (ViT-B/32, 0.6 GB; its
# ViT-L/14 is 1.7 GB). Any other hub id or folder is the operator's (a local studio's own page): loading one reads
# the server's disk or the hub for everyone's memory.
CLIP_CHOICES = [("none", ""), ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32")]


def shown(est: Estimate | None, signed: bool = False) -> str:
    """`0.62 ± 0.04 (n=12)` (a margin signed: `+0.21 ± 0.06 (n=12)`); empty when not measured."""
    if est is None:
        return ""
    return f"{est.mean:+.2f} ± {est.half_width:.2f} (n={est.n})" if signed else str(est)


def table(scores: ConceptScores) -> list[list]:
    """The score rows; a measure not taken (no baseline, no training pictures) is left empty."""
    return [[line.measure, shown(line.concept), shown(line.plain), shown(line.margin, signed=True), line.compares]
            for line in scores.lines]


def summary(scores: ConceptScores, model_name: str) -> str:
    """Markdown: who scored what, against which ground truth and baseline, and what was left out."""
    # Words like <my-cat> stay inside code spans, which show them as written; other text is escaped, or the
    # Markdown sanitizer would drop anything that looks like an HTML tag.
    plain = html.escape(scores.plain_words or "", quote=False)
    text = (f"`{scores.token}` on {html.escape(model_name, quote=False)}, scored by {' and '.join(scores.scorers)}"
            + (f" against the ground truth of {html.escape(scores.ground_truth, quote=False)}"
               if scores.ground_truth else "")
            + (f"; plain words: “{plain}”" if plain else "")
            + f"; {len(scores.samples)} pictures in {scores.seconds:.0f} s.")
    return "\n\n".join([text] + [f"Not measured: {html.escape(note, quote=False)}." for note in scores.notes])


def ground_truth_set(token: str, choice: str | None):
    """The concept set whose attributes the judge checks: by the concept's word (auto), a named one, or none."""
    if choice in (None, "", AUTO):
        return concept_set_for(token)
    return None if choice == NONE else load_concept_set(choice)


def reference_pictures(files) -> list[Image.Image]:
    """The uploaded training pictures, as RGB; a file that is no picture is named."""
    pictures = []
    for f in files or []:
        try:
            pictures.append(Image.open(f).convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{Path(f).name} is not a picture PIL can read ({exc}); upload PNG or JPEG files") from exc
    return pictures


class ClipCache:
    """The last CLIP model used, so that a second run does not load it again (one at a time: they are hundreds
    of MB)."""

    def __init__(self) -> None:
        self._loaded: dict[str, ClipScorer] = {}

    def get(self, source: str | None, device) -> ClipScorer | None:
        """The CLIP scorer of `source` (hub id or folder) on `device`; None when no source is named."""
        source = (source or "").strip()
        if not source:
            return None
        if source not in self._loaded:
            self._loaded.clear()
            self._loaded[source] = ClipScorer.load(source, device)
        return self._loaded[source]


def scored(studio: Studio, clips: ClipCache, demo: DemoWorld, session: str, token: str, cfg: ScoreConfig,
           ground_truth: str, files: list[str], clip_source: str, progress) -> ConceptScores:
    """Score the session's concept `token` on the loaded model (the GPU part: plain values in, a picklable result
    out; ZeroGPU runs it in a worker process). The session's "evaluate" flag stops it within one step. On the demo
    model the identity encoder of `demo` scores beside the judge; without one, a note says how to train it."""
    concept = studio.library.get(token, session)

    def on_progress(done: int, total: int, prompt: str) -> None:
        if progress is not None:
            progress((done, total), desc=prompt, unit="steps")

    identity, missing = None, None
    if studio.model.is_demo:
        try:
            identity = demo.identity()
        except ValueError as exc:  # IdentityError: not trained yet; the judge's scores still stand
            missing = f"identity ({exc})"
    scores = score_concept(studio.model, concept, cfg, judge=DemoJudge(),
                           concept_set=ground_truth_set(token, ground_truth),
                           reference_images=reference_pictures(files), clip=clips.get(clip_source, studio.model.device),
                           identity=identity, on_progress=on_progress,
                           cancel=studio.sessions.get(session).cancel_flag("evaluate"))
    if missing and scores.ground_truth:
        scores.notes.append(missing)
    return scores


def sample_grid(scores: ConceptScores, folder: Path) -> list[tuple[str, str]]:
    """Save the scored pictures in a new folder under `folder` (one per run); the gallery of them, captioned."""
    folder.mkdir(exist_ok=True)
    run = Path(tempfile.mkdtemp(dir=folder, prefix=time.strftime("%Y%m%d-%H%M%S-")))
    grid = []
    for k, sample in enumerate(scores.samples):
        path = save_png(sample.image, run / f"{k:03d}-{sample.subject}.png")
        grid.append((str(path), f"{sample.prompt} (seed {sample.seed})"))
    return grid


def evaluate(studio: Studio, on_device, session: str, token: str | None, cfg_fields: dict, ground_truth: str,
             files: list[str], clip_source: str, request: gr.Request | None = None, progress=None) -> tuple:
    """`/evaluate_concept`'s values: the summary, the score table and the pictures. `on_device` is `scored` (made a
    ZeroGPU task) with the studio and CLIP cache bound; `cfg_fields` the form's ScoreConfig values, as sent."""
    token = (token or "").strip()
    if not token:
        raise user_error("Pick a concept to score (train or import one first).", request)
    studio.sessions.get(session).fresh_cancel_flag("evaluate")
    with as_user_errors(request):
        cfg = ScoreConfig(samples=int(cfg_fields["samples"]), steps=int(cfg_fields["steps"]),
                          seed=int(cfg_fields["seed"] or 0), kind=cfg_fields["kind"] or "object",
                          plain_words=(cfg_fields["plain_words"] or "").strip() or None)
        scores = on_device(session, token, cfg, ground_truth, files, clip_source, progress)
    grid = sample_grid(scores, studio.sessions.get(session).folder / "evaluate")
    return summary(scores, studio.model.name), table(scores), grid


def clip_source_for(operator: Operator, clip_source: str | None, request: gr.Request | None = None) -> str:
    """The CLIP model an evaluation may load: one of CLIP_CHOICES, or anything on a local studio's own page."""
    clip_source = (clip_source or "").strip()
    if clip_source in [value for _, value in CLIP_CHOICES] or operator.owns_page(request):
        return clip_source
    raise user_error(f"{clip_source[:80]!r} is not a CLIP model this studio offers: pick one of "
                     f"{', '.join(value or label for label, value in CLIP_CHOICES)}", request)


def methods_compared(studio: Studio, demo: DemoWorld, session: str, methods: list[str], set_names: list[str],
                     cfg: EvalConfig, progress=None) -> dict:
    """Train `methods` (methods or the paper's variants: `VARIANTS`) on the bundled sets named and score them on the
    loaded demo model (the GPU part: plain values in, the results dict out). The session's "evaluate" flag stops it
    at the next training step."""
    if not studio.model.is_demo:
        raise ValueError("comparing methods needs the demo model's judge and concept sets: load the demo model in "
                         "the Model tab (leave its box empty and press Load)")
    try:
        identity = demo.identity()
    except ValueError:  # IdentityError: not trained yet; the judge's scores still stand
        identity = None
    total = len(methods) * len(set_names)
    done = []

    def on_progress(message: str) -> None:
        if progress is not None and message.startswith("training "):
            progress((len(done), total), desc=message, unit="runs")
            done.append(message)

    work = studio.sessions.get(session).folder / "methods"
    return compare_methods(studio.model, DemoJudge(), demo.concept_sets(set_names), methods, cfg, work, identity,
                           on_progress, cancel=studio.sessions.get(session).cancel_flag("evaluate"))


def tradeoff_chart(results: dict, folder: Path) -> tuple[str | None, str | None]:
    """The paper's chart of compared rows as a new PNG in `folder` (one per run); (None, why) when no row has both
    identity and prompt fidelity to place it by (every set failed, or no identity encoder)."""
    subjects = sorted({name for row in results.values() for name in row["subjects"]})
    if not subjects:
        return None, ("no chart: no object set was scored (the scores pool object sets only; a style or the diverse "
                      f"set asks other things): add one such as {object_sets()[0]}")
    # variants_chart reads the chart's subjects from a run's pooled scores; a comparison pools no plain-words row, so
    # only its subjects are given and the chart has no plain-words point.
    run = {"variants": results, "pooled": {"given": {"subjects": subjects}}}
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return str(variants_chart(run, folder / time.strftime("chart-%Y%m%d-%H%M%S.png"))), None
    except ValueError as exc:  # draw_tradeoff: no point to draw
        return None, f"no chart: {exc}"


def object_sets() -> list[str]:
    """The bundled concept sets whose scores the comparison pools (objects; not styles or the diverse set)."""
    return [name for name in list_concept_sets() if load_concept_set(name).kind == "object"]


def compare(studio: Studio, on_device, session: str, methods: list[str] | None, set_names: list[str] | None,
            cfg_fields: dict, request: gr.Request | None = None, progress=None,
            variants: list[str] | None = None) -> tuple[str, list[list[str]], str | None]:
    """`/compare_methods`' values: a summary, the methods table and the paper's chart of its rows (a PNG's path, or
    None with a note in the summary). `on_device` is `methods_compared` (made a ZeroGPU task) with the studio and
    world bound; `cfg_fields` the form's EvalConfig values, as sent; `variants` the paper's variants (`VARIANTS`)
    compared after the methods."""
    # In the studio's order, whatever order they came in: the methods, then the variants.
    methods = ([m for m in METHODS if m in (methods or [])]
               + [v for v in VARIANTS if v in (variants or []) and v not in (methods or [])])
    if not methods or not set_names:
        raise user_error("Pick at least one method or variant and one concept set to compare them on.", request)
    studio.sessions.get(session).fresh_cancel_flag("evaluate")
    with as_user_errors(request):
        cfg = EvalConfig(images=int(cfg_fields["images"]), steps=int(cfg_fields["steps"]),
                         train_steps=int(cfg_fields["train_steps"]), seed=int(cfg_fields["seed"] or 0))
        results = on_device(session, methods, list(set_names), cfg, progress)
    subjects = max(len(m["subjects"]) for m in results.values())
    chart, no_chart = tradeoff_chart(results, studio.sessions.get(session).folder / "methods")
    notes = method_notes(results) + ([no_chart] if no_chart else [])
    about = (f"{', '.join(methods)} trained {cfg.train_steps} steps on {', '.join(set_names)}; scores pooled over "
             f"{subjects} object sets (each `mean ± half-width (n=pictures)`, 95% interval), margins over TI paired "
             "by prompt and seed; file size and training time: mean over the sets.")
    return ("\n\n".join([about] + [html.escape(note, quote=False) for note in notes]), method_rows(results),
            chart)


def build_evaluate_tab(studio: Studio, pickers: ConceptPickers, operator: Operator | None = None) -> None:
    """Concept, samples, CLIP model and advanced settings; `/evaluate_concept` and `/cancel_evaluation` endpoints.
    `operator`: whether this page may name any CLIP model (a local studio's own page) or only CLIP_CHOICES."""
    operator = operator or Operator()
    handlers = evaluate_handlers(studio, operator)
    ui = evaluate_layout(pickers, operator)
    wire_evaluate(studio, ui, handlers)


def evaluate_handlers(studio: Studio, operator: Operator) -> SimpleNamespace:
    """The tab's handlers, by name: adapters from the form to the functions above (`run`: score a concept,
    `run_methods`: compare methods, `cancel`: stop either; `admit_methods` refuses a comparison before it waits)."""
    clips, demo = ClipCache(), DemoWorld()

    def score(session: str, token: str, cfg: ScoreConfig, ground_truth: str, files: list[str], clip_source: str,
              progress) -> ConceptScores:
        return scored(studio, clips, demo, session, token, cfg, ground_truth, files, clip_source, progress)

    on_device = gpu_task(score, EVALUATE_SECONDS)

    def train_and_score(session: str, methods: list[str], set_names: list[str], cfg: EvalConfig, progress) -> dict:
        return methods_compared(studio, demo, session, methods, set_names, cfg, progress)

    methods_on_device = gpu_task(train_and_score, TRAIN_SECONDS)

    def run_methods(methods, set_names, train_steps, images, steps, seed, variants, request: gr.Request,
                    progress=gr.Progress()):
        cfg_fields = dict(train_steps=train_steps, images=images, steps=steps, seed=seed)
        return compare(studio, methods_on_device, studio.session_of(request), methods, set_names, cfg_fields,
                       request, progress, variants)

    def run(token, samples, clip_source, ground_truth, kind, plain_words, steps, seed, files,
            request: gr.Request, progress=gr.Progress()):
        cfg_fields = dict(samples=samples, steps=steps, seed=seed, kind=kind, plain_words=plain_words)
        return evaluate(studio, on_device, studio.session_of(request), token, cfg_fields, ground_truth,
                        [str(f) for f in files or []], clip_source_for(operator, clip_source, request), request,
                        progress)

    def cancel(request: gr.Request) -> None:
        studio.session(request).cancel("evaluate")

    def admit_methods(form: dict) -> None:  # before the job waits: each of its runs within the step limit
        studio.check_train_steps(form["train_steps"], "Training steps per method")

    return SimpleNamespace(run=run, run_methods=run_methods, cancel=cancel, admit_methods=admit_methods)


def evaluate_layout(pickers: ConceptPickers, operator: Operator) -> SimpleNamespace:
    """The tab's components, by name: the concept's evaluation, then the methods' comparison folded below it."""
    ui = SimpleNamespace()
    concept_layout(ui, pickers, operator)
    methods_layout(ui)
    return ui


def concept_layout(ui: SimpleNamespace, pickers: ConceptPickers, operator: Operator) -> None:
    """Score one concept: the form (concept, pictures per prompt, CLIP model, advanced settings) and, beside it, the
    scores and the pictures they came from; the components go in `ui`."""
    gr.Markdown("Score a concept the way the Textual Inversion paper does: draw “a photo of S*” (does it look like "
                "the concept?) and edit prompts like “S* on a black background” (does the rest of the prompt still "
                "work?), and the same prompts with plain words instead of S*. The demo model is scored by its judge "
                "against a bundled concept set (and by its identity encoder against the training pictures); any model "
                "by CLIP when you name a CLIP model. Each score shows its 95% interval and the pictures it rests "
                "on: 0.62 ± 0.04 (n=12).")
    with gr.Row():
        with gr.Column():
            ui.token = pickers.dropdown("Concept", custom=True, elem_id="evaluate-concept")  # API clients name any word
            ui.samples = gr.Slider(1, 8, value=2, step=1, label="Pictures per prompt")
            # Custom values reach `clip_source_for`, which refuses them (one line) unless this is a local page.
            ui.clip_source = gr.Dropdown(CLIP_CHOICES, value="", allow_custom_value=True,
                                         label="CLIP model (optional" + ("; or type a hub id or folder)"
                                                                         if operator.local else ")"))
            with gr.Accordion("Advanced", open=False):
                ui.ground_truth = gr.Dropdown([AUTO, *list_concept_sets(), NONE], value=AUTO,
                                              label="Ground truth for the judge (bundled concept set)")
                ui.kind = gr.Radio(["object", "style"], value="object", label="What is it? (when no set says)")
                ui.plain_words = gr.Textbox(label="Plain words to compare with",
                                            placeholder="default: the set's plain words, or the word it started "
                                                        "from; for a style, a phrase like 'in watercolor style'")
                ui.steps = gr.Slider(1, 50, value=ScoreConfig.steps, step=1, label="Sampling steps")
                ui.seed = gr.Number(label="First seed", value=0, precision=0)
                ui.files = gr.File(label="Training pictures (CLIP compares with them; on the demo model without a "
                                         "set, the judge reads what they share)", file_count="multiple",
                                   file_types=["image"])
            with gr.Row():
                ui.start = gr.Button("Evaluate", variant="primary")
                ui.stop = gr.Button("Cancel")
        with gr.Column():
            ui.about = gr.Markdown(elem_id="evaluate-summary")
            ui.scores = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True, elem_id="evaluate-scores",
                                     elem_classes=["whole-words"],
                                     column_widths=["22%", "15%", "15%", "15%", "33%"])
            ui.grid = gr.Gallery(label="The pictures the scores came from", columns=4, height=420,
                                 elem_id="evaluate-grid")


def methods_layout(ui: SimpleNamespace) -> None:
    """Compare training methods and the paper's variants, folded away: what to train on which sets, and, beside it,
    the methods table and the chart; the components go in `ui`."""
    with gr.Accordion("Compare training methods and the paper's variants (demo model)", open=False):
        gr.Markdown("Train each method and variant on bundled concept sets and score them alike: identity (does it "
                    "look like the pictures?), prompt fidelity (do edit prompts still work?), file size and training "
                    "time, the table `studio eval --methods` prints, and the paper's chart of identity against "
                    "prompt fidelity. Each one trains on each set in turn.")
        with gr.Row():
            with gr.Column():
                ui.methods = gr.CheckboxGroup(list(METHODS), value=["ti", "lora"], label="Methods",
                                              elem_id="evaluate-methods")
                ui.variants = gr.CheckboxGroup(list(PAPER_VARIANTS), value=[], elem_id="evaluate-variants",
                                               label="The paper's variants (of Textual Inversion: three vectors, "
                                                     "progressive, regularized, per-image words, ...)")
                ui.method_sets = gr.Dropdown(list_concept_sets(), value=object_sets()[:1], multiselect=True,
                                             label="Concept sets (the scores pool the object sets)")
                ui.train_steps = gr.Slider(1, 1000, value=100, step=1, label="Training steps per method")
                ui.method_images = gr.Slider(1, 4, value=1, step=1, label="Pictures per prompt")
                ui.method_steps = gr.Slider(1, 50, value=ScoreConfig.steps, step=1, label="Sampling steps")
                ui.method_seed = gr.Number(label="Seed", value=0, precision=0)
                with gr.Row():
                    ui.compare_start = gr.Button("Compare", variant="primary")
                    ui.compare_stop = gr.Button("Cancel")
            with gr.Column():
                ui.methods_about = gr.Markdown(elem_id="evaluate-methods-summary")
                ui.methods_table = gr.Dataframe(headers=METHOD_HEADERS, interactive=False, wrap=True,
                                                elem_classes=["whole-words"],
                                                elem_id="evaluate-methods-table")
                ui.methods_chart = gr.Image(label="Identity against prompt fidelity (95% intervals)", type="filepath",
                                            interactive=False, elem_id="evaluate-methods-chart")


def wire_evaluate(studio: Studio, ui: SimpleNamespace, handlers: SimpleNamespace) -> None:
    """`/evaluate_concept`, `/cancel_evaluation` and `/compare_methods` (its Cancel is the page's own)."""
    evaluated = ui.start.click(in_turn(studio, handlers.run, "evaluate", uploads=("files",)),
                               [ui.token, ui.samples, ui.clip_source, ui.ground_truth, ui.kind, ui.plain_words,
                                ui.steps, ui.seed, ui.files],
                               [ui.about, ui.scores, ui.grid], api_name="evaluate_concept", **GPU_EVENT)
    ui.stop.click(handlers.cancel, None, None, api_name="cancel_evaluation", concurrency_limit=None,
                  cancels=[evaluated])
    queued_methods = in_turn(studio, handlers.run_methods, "evaluate", check=handlers.admit_methods)
    compared = ui.compare_start.click(queued_methods,
                                      [ui.methods, ui.method_sets, ui.train_steps, ui.method_images, ui.method_steps,
                                       ui.method_seed, ui.variants],
                                      [ui.methods_about, ui.methods_table, ui.methods_chart],
                                      api_name="compare_methods", **GPU_EVENT)
    ui.compare_stop.click(handlers.cancel, None, None, api_visibility="private", concurrency_limit=None,
                          cancels=[compared])

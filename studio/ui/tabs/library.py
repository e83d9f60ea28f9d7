"""Library tab: the shared concept folder plus this session's concepts, with thumbnails, what each was trained on,
why a file does not fit the loaded model, and rename / delete (with a confirmation step) / export / import.

Imported files are this session's only (other users of the same server never see them) until "Save to the
shared library" writes them into the library folder.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio.engine.learned.lora_files import is_lora_file
from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word_files import IMAGE_SUFFIXES
from studio.engine.names import file_stem, inside
from studio.library import LibraryEntry
from studio.ui.pickers import ConceptPickers
from studio.ui.state import USER_ERRORS, as_user_errors, Studio, user_error
from studio.ui.turns import GPU_EVENT, consumed, in_turn

# The first seven columns are an embedding's; kind, rank and size come after, so a client's column indices hold.
HEADERS = ["token", "vectors", "fits", "reason", "source", "trained on", "steps", "kind", "rank", "size"]
EXPORT_SUFFIX = {"studio": ".safetensors", "diffusers": ".safetensors", "kohya": ".safetensors", "a1111": ".pt"}


def source_of(entry: LibraryEntry, root: Path) -> str:
    """Where an entry is from as users may read it: its path inside the shared library folder (`root`), or "this
    session"; never a server path."""
    if entry.path is None:
        return "this session"
    try:
        return entry.path.relative_to(root).as_posix()
    except ValueError:  # a file outside the folder (none should be): its name only
        return entry.path.name


def row(entry: LibraryEntry, root: Path) -> list:
    """One table row; `reason` says why a file does not fit (or cannot be read), empty when it fits; `source` is the
    file inside the library folder `root` (`source_of`). A LoRA's row (token: its name, as `<lora:name>` writes it)
    gives its rank, its families and the vectors of its words."""
    source = source_of(entry, root)
    lora = entry.lora
    if lora is not None:
        vectors = sum(word.n_vectors for word in lora.words) or ""
        return [entry.token, vectors, entry.fits, entry.reason, source, "/".join(lora.families), "", entry.kind,
                lora.rank, human_size(lora.size_bytes)]
    meta = entry.concept.meta if entry.concept else {}
    trained_on = " / ".join(v for v in (meta.get("base_model", ""), entry.concept.family if entry.concept else "") if v)
    return [entry.token, entry.concept.n_vectors if entry.concept else "", entry.fits, entry.reason, source,
            trained_on, meta.get("steps", ""), entry.kind, "", ""]


def human_size(size_bytes: int) -> str:
    """A file size as people read it: 812 B, 35.2 KB, 151.1 MB."""
    size = float(size_bytes)
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def thumbnail(studio: Studio, entry: LibraryEntry, session: str) -> Path | None:
    """A picture for the entry: one made in this session, A1111's `<name>.preview.png`, or a picture embedding."""
    made = studio.sessions.get(session).thumbnails.get(entry.token)
    if made is not None and made.is_file():
        return made
    if entry.path is None:
        return None
    beside = entry.path.with_name(entry.path.stem + ".preview.png")
    if beside.is_file():
        return beside
    return entry.path if entry.path.suffix.lower() in IMAGE_SUFFIXES else None


def details(entry: LibraryEntry | None, root: Path) -> str:
    """Markdown about one entry: where it is from (`source_of`, inside the library folder `root`), its shape, what it
    was trained on, and whether it fits."""
    if entry is None:
        return "Pick a concept to see what it is."
    where = f"`{source_of(entry, root)}`" if entry.path else "this session only (not saved)"
    lines = [f"`{entry.token}` — {where}"]
    if entry.lora is not None:
        lora = entry.lora
        parts = ", ".join(f"{part}: {sum(n.values())} layers" for part, n in lora.targets.items())
        lines.append(f"{entry.kind}, rank {lora.rank}, {human_size(lora.size_bytes)}, for "
                     f"{'/'.join(lora.families) or 'an unknown family'} ({parts}); in a prompt: "
                     f"`{entry.prompt_text}`")
        if lora.words:
            lines.append("Words it brings: " + html.escape(", ".join(w.token for w in lora.words), quote=False))
    if entry.concept is not None:
        c = entry.concept
        shapes = ", ".join(f"{k}: {c.n_vectors}×{d}" for k, d in c.dims.items())
        lines.append(f"{c.n_vectors} vector(s) ({shapes}), likely family {c.family}")
        shown = ("base_model", "init_text", "steps", "created", "source_format")
        meta = {k: v for k, v in c.meta.items() if k in shown and v}
        if meta:
            lines.append(html.escape(", ".join(f"{k}: {v}" for k, v in meta.items()), quote=False))
    # Tokens look like HTML tags (<my-cat>): escaped, or the Markdown sanitizer drops them from the text.
    reason = html.escape(entry.reason, quote=False)
    lines.append("Fits the loaded model." if entry.fits else f"**Does not fit:** {reason}")
    return "\n\n".join(lines)


def find(studio: Studio, token: str, session: str, request: gr.Request | None = None) -> LibraryEntry:
    """The session's entry called `token`; gr.Error when there is none."""
    for entry in studio.entries(session):
        if entry.token == (token or "").strip():
            return entry
    raise user_error(f"No concept named {token!r}: pick one from the list (or refresh it).", request)


def rows(studio: Studio, session: str) -> list[list]:
    """The table: every concept the session sees."""
    return [row(e, studio.library.root) for e in studio.entries(session)]


def gallery(studio: Studio, session: str) -> list[tuple[str, str]]:
    """The thumbnails of the session's concepts, captioned with their words."""
    shown = []
    for entry in studio.entries(session):
        picture = thumbnail(studio, entry, session)
        if picture is not None:
            shown.append((str(picture), entry.token + ("" if entry.fits else " (does not fit)")))
    return shown


def show(studio: Studio, session: str, token: str | None) -> str:
    """The details of the picked concept (a prompt to pick one when it is none)."""
    return details(next((e for e in studio.entries(session) if e.token == (token or "").strip()), None),
                   studio.library.root)


def import_files(studio: Studio, session: str, files: list | None) -> tuple[str, list[list]]:
    """Add concept files to the session: a report line per file (what it became, why it failed) and the table."""
    lines = []
    for f in files or []:
        name = Path(f).name
        try:
            if is_lora_file(f):
                lora = studio.library.add_session_lora(session, f)
                entry = find(studio, lora.name, session)
                note = "" if entry.fits else f" — it does not fit the loaded model: {entry.reason}"
                lines.append(f"{name}: added {entry.kind} {entry.prompt_text} to this session{note}")
                continue
            concept = load_concept(f)
        except USER_ERRORS as exc:
            lines.append(f"{name}: {exc}")
            continue
        added = studio.library.add_session_concept(session, concept, if_taken="keep both")
        entry = find(studio, added.token, session)
        note = "" if entry.fits else f" — it does not fit the loaded model: {entry.reason}"
        renamed = "" if added.token == concept.token else f" (this session already had {concept.token})"
        lines.append(f"{name}: added {added.token} to this session{renamed}{note}")
    return "\n".join(lines), rows(studio, session)


def export_concept(studio: Studio, session: str, token: str, fmt: str, request: gr.Request | None = None) -> str:
    """Write the concept in format `fmt` to the session's export folder; the file's path."""
    out = studio.sessions.get(session).folder / "export"  # a folder Gradio serves files from
    out.mkdir(exist_ok=True)
    lora = next((e.lora for e in studio.entries(session) if e.lora is not None and e.token == token.strip()), None)
    if lora is not None:  # handed out as the file it is
        if fmt != lora.source_format:
            raise user_error(f"{lora.name} is a LoRA file in {lora.source_format} form, which is what Export "
                             f"hands out: choose the format {lora.source_format}", request)
        return str(shutil.copyfile(lora.path, inside(out, file_stem(lora.name) + lora.path.suffix)))
    with as_user_errors(request):
        concept = studio.library.get(token.strip(), session)
        suffix = ".safetensors" if concept.family == "sdxl" else EXPORT_SUFFIX[fmt]
        return str(save_concept(concept, inside(out, file_stem(concept.token) + suffix), format=fmt))


def rename_concept(studio: Studio, session: str, token: str, new_token: str,
                   request: gr.Request | None = None) -> tuple[str, str]:
    """Rename a concept (its thumbnail goes with it); the report and the new word."""
    old, new = (token or "").strip(), (new_token or "").strip()
    with as_user_errors(request):
        studio.library.rename(old, new, session)
    studio.sessions.get(session).rename_thumbnail(old, new)
    return f"renamed {old} to {new}", new


def delete_question(studio: Studio, session: str, token: str, request: gr.Request | None = None) -> str:
    """What the confirmation step asks before deleting `token`: where it is, and whom that touches."""
    entry = find(studio, token, session, request)
    where = ("It is only in this session." if entry.path is None else
             f"This deletes `{entry.path.name}` from the shared library folder, for every user; "
             "it cannot be undone.")
    return f"Delete `{entry.token}`? {where}"


def delete_concept(studio: Studio, session: str, token: str,
                   request: gr.Request | None = None) -> tuple[str, list[list]]:
    """Delete a concept (and its thumbnail); the report and the table."""
    with as_user_errors(request):
        studio.library.delete(token.strip(), session)
    studio.sessions.get(session).thumbnails.pop(token.strip(), None)
    return f"deleted {token}", rows(studio, session)


def save_to_library(studio: Studio, session: str, token: str, if_taken: str | None,
                    request: gr.Request | None = None) -> str:
    """Save a session concept to the shared library; the report. `if_taken`: what to do when the word or its file
    is already there ("refuse", "replace", "keep both"); refusing names the file, and the page then asks."""
    entry = find(studio, token, session, request)
    if entry.path is not None:  # saved already (a second click): nothing to do, and nothing wrong
        return f"{entry.token} is saved in the shared library already ({entry.path.name})"
    if entry.lora is not None:  # a LoRA is saved as the file it is; its name is the file's, so none is chosen
        with as_user_errors(request):
            saved_entry = studio.library.import_file(entry.lora.path)
        studio.library.delete(entry.token, session)  # the file now serves this session too
        return f"saved {entry.token} to {saved_entry.path.name}; every user of this studio can use it now"
    with as_user_errors(request):
        path = studio.library.save(entry.concept, if_taken=if_taken or "refuse")
    saved = load_concept(path).token
    studio.library.delete(entry.token, session)  # the file now serves this session too
    if saved != entry.token:
        studio.sessions.get(session).rename_thumbnail(entry.token, saved)
    kept = f" as {saved} (the library already had {entry.token})" if saved != entry.token else ""
    return f"saved {entry.token}{kept} to {path.name}; every user of this studio can use it now"


def taken_question(studio: Studio, session: str, token: str, request: gr.Request | None = None) -> str:
    """The replace / keep-both question when saving `token` would meet a file of the shared library; "" if not."""
    entry = find(studio, token, session, request)
    holder = next((e for e in studio.library.entries() if e.path is not None and e.token == entry.token), None)
    if entry.path is not None or holder is None:
        return ""
    return (f"`{entry.token}` is already in the shared library (`{holder.path.name}`): replace that "
            "file for every user, or keep both (yours gets the next free word)?")


def save_or_ask_first(studio: Studio, session: str, token: str, request: gr.Request | None = None) -> tuple:
    """The page's Save: (report, question box, question). When the word is taken, the replace / keep-both question
    and no save (and no red error beside the question); else the save and the question folded away."""
    question = taken_question(studio, session, token, request)
    if question:
        return gr.update(), gr.update(visible=True), question
    return save_to_library(studio, session, token, "refuse", request), hidden(), ""


def preview_concept(studio: Studio, session: str, token: str,
                    request: gr.Request | None = None) -> list[tuple[str, str]]:
    """Draw "a photo of <token>" as the concept's thumbnail in this session; the thumbnails."""
    entry = find(studio, token, session, request)
    if not entry.fits:
        raise user_error(f"{entry.token} does not fit the loaded model: {entry.reason}", request)
    paths = studio.run_generate(dict(prompt=f"a photo of {entry.prompt_text}", seed=0), session, None, request)
    studio.sessions.get(session).thumbnails[entry.token] = Path(paths[0])
    return gallery(studio, session)


def hidden():
    """The update that folds a question away."""
    return gr.update(visible=False)


def library_layout() -> SimpleNamespace:
    """The tab's components, by name."""
    ui = SimpleNamespace()
    gr.Markdown("Concepts in the shared folder and in this session: words (embeddings) and LoRA files, which a "
                "prompt names as `<lora:name:0.8>`. Files that don't fit the loaded model say why. "
                "Imported files stay in this session until you save them to the shared library.")
    # fit_columns=False: one thumbnail keeps its 1/8 of the width (Gradio widens it to the whole row, 1200 px in a
    # 180-px frame); eight columns make ~145-px cells that fit the frame.
    ui.thumbs = gr.Gallery(label="Thumbnails", columns=8, height=180, allow_preview=False, object_fit="contain",
                           fit_columns=False, elem_id="library-thumbs", elem_classes=["pixel-art"])
    ui.table = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True, elem_id="library-table",
                            column_widths=["13%", "8%", "5%", "29%", "13%", "9%", "6%", "6%", "5%", "6%"],
                            elem_classes=["whole-words"])
    with gr.Row():
        ui.refresh = gr.Button("Refresh")
        ui.upload = gr.File(label="Import concept files (this session)", file_count="multiple",
                            elem_id="library-import")
    with gr.Row():
        ui.token = gr.Dropdown(label="Concept", choices=[], allow_custom_value=True)
        ui.info = gr.Markdown(elem_id="library-info")
    with gr.Row():
        ui.preview = gr.Button("Make a thumbnail")
        ui.keep = gr.Button("Save to the shared library")
        ui.fmt = gr.Dropdown(["studio", "diffusers", "a1111", "kohya"], value="studio", label="Export format")
        ui.export = gr.Button("Export")
    with gr.Row():
        ui.new_name = gr.Textbox(label="New word", placeholder="<new-name>")
        ui.rename = gr.Button("Rename")
        ui.delete = gr.Button("Delete…", variant="stop")
    with gr.Group(visible=False, elem_id="library-taken") as ui.taken:
        ui.taken_question = gr.Markdown()
        with gr.Row():
            ui.replace = gr.Button("Replace it", variant="stop")
            ui.keep_both = gr.Button("Keep both")
            ui.keep_theirs = gr.Button("Don't save")
    ui.if_taken = gr.Radio(["refuse", "replace", "keep both"], value="refuse", visible=False,
                           label="If the word is already in the shared library")
    ui.save_api = gr.Button("Save (API)", visible=False)  # `/save_concept`: clients say what to do if taken
    with gr.Group(visible=False, elem_id="library-confirm") as ui.confirm:
        ui.question = gr.Markdown()
        with gr.Row():
            ui.yes = gr.Button("Yes, delete", variant="stop")
            ui.no = gr.Button("Keep it")
    ui.exported = gr.File(label="Exported file")
    ui.report = gr.Textbox(label="Result")
    return ui


def wire_concept_list(studio: Studio, pickers: ConceptPickers, ui: SimpleNamespace) -> None:
    """The table, thumbnails and details, import and export: `/library`, `/import_concepts`, `/export_concept`."""
    pickers.view(ui.table, lambda session: rows(studio, session))
    pickers.view(ui.thumbs, lambda session: gallery(studio, session))
    pickers.view(ui.token, lambda session: gr.update(choices=[e.token for e in studio.entries(session)]))

    def list_library(request: gr.Request):
        return rows(studio, studio.session_of(request))

    def show_picked(token, request: gr.Request):
        return show(studio, studio.session_of(request), token)

    def pick_row(event: gr.SelectData):
        return event.row_value[0]

    def import_uploads(files, request: gr.Request):
        session = studio.session_of(request)
        with consumed(studio, files):  # the session keeps its own copy of what it takes; Gradio's goes, refused too
            with as_user_errors(request):
                studio.sessions.get(session).make_room(sum(Path(f).stat().st_size for f in files or []))
            return import_files(studio, session, files)

    def export(token, fmt, request: gr.Request):
        return export_concept(studio, studio.session_of(request), token, fmt, request)

    pickers.after(ui.refresh.click(list_library, None, ui.table, api_name="library"))
    pickers.after(ui.upload.upload(import_uploads, ui.upload, [ui.report, ui.table], api_name="import_concepts"))
    ui.export.click(export, [ui.token, ui.fmt], ui.exported, api_name="export_concept")
    ui.token.change(show_picked, ui.token, ui.info, api_visibility="private")
    ui.table.select(pick_row, None, ui.token, api_visibility="private")


def wire_rename_and_delete(studio: Studio, pickers: ConceptPickers, ui: SimpleNamespace) -> None:
    """Rename, and delete after a confirmation step: `/rename_concept`, `/delete_concept`."""
    def rename(token, new_token, request: gr.Request):
        return rename_concept(studio, studio.session_of(request), token, new_token, request)

    def ask_delete(token, request: gr.Request):
        return gr.update(visible=True), delete_question(studio, studio.session_of(request), token, request)

    def delete(token, request: gr.Request):
        return delete_concept(studio, studio.session_of(request), token, request)

    pickers.after(ui.rename.click(rename, [ui.token, ui.new_name], [ui.report, ui.token], api_name="rename_concept"))
    ui.delete.click(ask_delete, ui.token, [ui.confirm, ui.question], api_visibility="private")
    deleted = ui.yes.click(delete, ui.token, [ui.report, ui.table], api_name="delete_concept")
    deleted.then(hidden, None, ui.confirm, api_visibility="private")
    pickers.after(deleted)
    ui.no.click(hidden, None, ui.confirm, api_visibility="private")


def wire_saving(studio: Studio, pickers: ConceptPickers, ui: SimpleNamespace) -> None:
    """Save to the shared library (asking when the word is taken) and thumbnails: `/save_concept`,
    `/preview_concept`."""
    def save(token, if_taken, request: gr.Request):
        return save_to_library(studio, studio.session_of(request), token, if_taken, request)

    def save_as(choice: str):
        def save_chosen(token, request: gr.Request):
            return save_to_library(studio, studio.session_of(request), token, choice, request)
        return save_chosen

    def save_or_ask(token, request: gr.Request):
        return save_or_ask_first(studio, studio.session_of(request), token, request)

    def show_picked(token, request: gr.Request):
        return show(studio, studio.session_of(request), token)

    def preview(token, request: gr.Request):
        return preview_concept(studio, studio.session_of(request), token, request)

    # One event per click: a taken word asks (no red error beside the question), then the details say where the
    # concept now is (no longer "this session only").
    saved = [ui.save_api.click(save, [ui.token, ui.if_taken], ui.report, api_name="save_concept"),
             ui.keep.click(save_or_ask, ui.token, [ui.report, ui.taken, ui.taken_question],
                           api_visibility="private")]
    for button, choice in ((ui.replace, "replace"), (ui.keep_both, "keep both")):
        chosen = button.click(save_as(choice), ui.token, ui.report, api_visibility="private")
        chosen.then(hidden, None, ui.taken, api_visibility="private")
        saved.append(chosen)
    for event in saved:
        event.then(show_picked, ui.token, ui.info, api_visibility="private", show_progress="hidden")
        pickers.after(event)
    ui.keep_theirs.click(hidden, None, ui.taken, api_visibility="private")
    ui.preview.click(in_turn(studio, preview, "generate"), ui.token, ui.thumbs, api_name="preview_concept",
                     **GPU_EVENT)


def build_library_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Table, thumbnails and actions; endpoints `/library`, `/import_concepts`, `/export_concept`,
    `/rename_concept`, `/delete_concept`, `/save_concept`, `/preview_concept`."""
    ui = library_layout()
    wire_concept_list(studio, pickers, ui)
    wire_rename_and_delete(studio, pickers, ui)
    wire_saving(studio, pickers, ui)

"""Library tab: the shared concept folder plus this session's concepts, with thumbnails, what each was trained on,
why a file does not fit the loaded model, and rename / delete (with a confirmation step) / export / import.

Imported files are this session's only (other users of the same server never see them) until "Save to the
shared library" writes them into the library folder.
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from studio.engine.concepts import IMAGE_SUFFIXES, load_concept, save_concept
from studio.engine.names import file_stem, inside
from studio.library import LibraryEntry
from studio.ui.pickers import ConceptPickers
from studio.ui.state import USER_ERRORS, Studio, user_error

HEADERS = ["token", "vectors", "fits", "reason", "source", "trained on", "steps"]
EXPORT_SUFFIX = {"studio": ".safetensors", "diffusers": ".safetensors", "kohya": ".safetensors", "a1111": ".pt"}


def row(entry: LibraryEntry) -> list:
    """One table row; `reason` says why a file does not fit (or cannot be read), empty when it fits."""
    meta = entry.concept.meta if entry.concept else {}
    trained_on = " / ".join(v for v in (meta.get("base_model", ""), entry.concept.family if entry.concept else "") if v)
    return [entry.token, entry.concept.n_vectors if entry.concept else "", entry.fits, entry.reason,
            str(entry.path) if entry.path else "this session", trained_on, meta.get("steps", "")]


def thumbnail(studio: Studio, entry: LibraryEntry, session: str) -> Path | None:
    """A picture for the entry: one made in this session, A1111's `<name>.preview.png`, or a picture embedding."""
    made = studio.thumbnails.get((session, entry.token))
    if made is not None and made.is_file():
        return made
    if entry.path is None:
        return None
    beside = entry.path.with_name(entry.path.stem + ".preview.png")
    if beside.is_file():
        return beside
    return entry.path if entry.path.suffix.lower() in IMAGE_SUFFIXES else None


def details(entry: LibraryEntry | None) -> str:
    """Markdown about one entry: where it is from, its shape, what it was trained on, and whether it fits."""
    if entry is None:
        return "Pick a concept to see what it is."
    lines = [f"`{entry.token}` — " + (f"`{entry.path}`" if entry.path else "this session only (not saved)")]
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


def build_library_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Table, thumbnails and actions; endpoints `/library`, `/import_concepts`, `/export_concept`,
    `/rename_concept`, `/delete_concept`, `/save_concept`, `/preview_concept`."""
    # 1. Pure functions.
    def find(token: str, session: str, request: gr.Request | None = None) -> LibraryEntry:
        for entry in studio.entries(session):
            if entry.token == (token or "").strip():
                return entry
        raise user_error(f"No concept named {token!r}: pick one from the list (or refresh it).", request)

    def rows(session: str) -> list[list]:
        return [row(e) for e in studio.entries(session)]

    def gallery(session: str) -> list[tuple[str, str]]:
        shown = []
        for entry in studio.entries(session):
            picture = thumbnail(studio, entry, session)
            if picture is not None:
                shown.append((str(picture), entry.token + ("" if entry.fits else " (does not fit)")))
        return shown

    def all_tokens(session: str):
        return gr.update(choices=[e.token for e in studio.entries(session)])

    def list_library(request: gr.Request):
        return rows(studio.session_of(request))

    def show(token, request: gr.Request) -> str:
        session = studio.session_of(request)
        return details(next((e for e in studio.entries(session) if e.token == (token or "").strip()), None))

    def pick_row(event: gr.SelectData):
        return event.row_value[0]

    def import_files(files, request: gr.Request):
        session = studio.session_of(request)
        lines = []
        for f in files or []:
            name = Path(f).name
            try:
                concept = load_concept(f)
            except USER_ERRORS as exc:
                lines.append(f"{name}: {exc}")
                continue
            added = studio.library.add_session_concept(session, concept, if_taken="keep both")
            entry = find(added.token, session)
            note = "" if entry.fits else f" — it does not fit the loaded model: {entry.reason}"
            renamed = "" if added.token == concept.token else f" (this session already had {concept.token})"
            lines.append(f"{name}: added {added.token} to this session{renamed}{note}")
        return "\n".join(lines), rows(session)

    def export_concept(token, fmt, request: gr.Request):
        session = studio.session_of(request)
        try:
            concept = studio.library.get(token.strip(), session)
            out = studio.session_dir(session) / "export"
            out.mkdir(exist_ok=True)
            suffix = ".safetensors" if concept.family == "sdxl" else EXPORT_SUFFIX[fmt]
            return str(save_concept(concept, inside(out, file_stem(concept.token) + suffix), format=fmt))
        except USER_ERRORS as exc:
            raise user_error(exc, request) from exc

    def rename_concept(token, new_token, request: gr.Request):
        session = studio.session_of(request)
        old, new = (token or "").strip(), (new_token or "").strip()
        try:
            studio.library.rename(old, new, session)
        except USER_ERRORS as exc:
            raise user_error(exc, request) from exc
        if (session, old) in studio.thumbnails:
            studio.thumbnails[(session, new)] = studio.thumbnails.pop((session, old))
        return f"renamed {old} to {new}", new

    def ask_delete(token, request: gr.Request):
        entry = find(token, studio.session_of(request), request)
        where = ("It is only in this session." if entry.path is None else
                 f"This deletes `{entry.path.name}` from the shared library folder, for every user; "
                 "it cannot be undone.")
        return gr.update(visible=True), f"Delete `{entry.token}`? {where}"

    def delete_concept(token, request: gr.Request):
        session = studio.session_of(request)
        try:
            studio.library.delete(token.strip(), session)
        except USER_ERRORS as exc:
            raise user_error(exc, request) from exc
        studio.thumbnails.pop((session, token.strip()), None)
        return f"deleted {token}", rows(session)

    def save_to_library(token, if_taken, request: gr.Request):
        """`if_taken`: what to do when the word or its file is already in the shared library ("refuse", "replace",
        "keep both"); refusing names the file, and the page then asks."""
        session = studio.session_of(request)
        entry = find(token, session, request)
        if entry.path is not None:
            raise user_error(f"{entry.token} is already in the shared library ({entry.path.name}).", request)
        try:
            path = studio.library.save(entry.concept, if_taken=if_taken or "refuse")
        except USER_ERRORS as exc:
            raise user_error(exc, request) from exc
        saved = load_concept(path).token
        studio.library.delete(entry.token, session)  # the file now serves this session too
        if saved != entry.token and (session, entry.token) in studio.thumbnails:
            studio.thumbnails[(session, saved)] = studio.thumbnails.pop((session, entry.token))
        kept = f" as {saved} (the library already had {entry.token})" if saved != entry.token else ""
        return f"saved {entry.token}{kept} to {path.name}; every user of this studio can use it now"

    def save_as(choice: str):
        def save_chosen(token, request: gr.Request):
            return save_to_library(token, choice, request)
        return save_chosen

    def ask_if_taken(token, request: gr.Request):
        """Show the replace / keep-both question when saving `token` would meet a file of the shared library."""
        entry = find(token, studio.session_of(request), request)
        holder = next((e for e in studio.library.entries() if e.path is not None and e.token == entry.token), None)
        if entry.path is not None or holder is None:
            return gr.update(visible=False), ""
        return gr.update(visible=True), (f"`{html.escape(entry.token)}` is already in the shared library "
                                         f"(`{holder.path.name}`): replace that file for every user, or keep both "
                                         "(yours gets the next free word)?")

    def preview_concept(token, request: gr.Request):
        session = studio.session_of(request)
        entry = find(token, session, request)
        if not entry.fits:
            raise user_error(f"{entry.token} does not fit the loaded model: {entry.reason}", request)
        paths = studio.run_generate(dict(prompt=f"a photo of {entry.token}", seed=0), session, None, request)
        studio.thumbnails[(session, entry.token)] = Path(paths[0])
        return gallery(session)

    # 2. Layout.
    gr.Markdown("Concepts in the shared folder and in this session. Files that don't fit the loaded model say why. "
                "Imported files stay in this session until you save them to the shared library.")
    thumbs = gr.Gallery(label="Thumbnails", columns=6, height=180, allow_preview=False, object_fit="contain",
                        elem_classes=["pixel-art"])
    table = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True, elem_id="library-table",
                         column_widths=["14%", "8%", "6%", "42%", "14%", "10%", "6%"])
    with gr.Row():
        refresh = gr.Button("Refresh")
        upload = gr.File(label="Import concept files (this session)", file_count="multiple", elem_id="library-import")
    with gr.Row():
        token = gr.Dropdown(label="Concept", choices=[], allow_custom_value=True)
        info = gr.Markdown(elem_id="library-info")
    with gr.Row():
        preview = gr.Button("Make a thumbnail")
        keep = gr.Button("Save to the shared library")
        fmt = gr.Dropdown(["studio", "diffusers", "a1111", "kohya"], value="studio", label="Export format")
        export = gr.Button("Export")
    with gr.Row():
        new_name = gr.Textbox(label="New word", placeholder="<new-name>")
        rename = gr.Button("Rename")
        delete = gr.Button("Delete…", variant="stop")
    with gr.Group(visible=False, elem_id="library-taken") as taken:
        taken_question = gr.Markdown()
        with gr.Row():
            replace = gr.Button("Replace it", variant="stop")
            keep_both = gr.Button("Keep both")
            keep_theirs = gr.Button("Don't save")
    if_taken = gr.Radio(["refuse", "replace", "keep both"], value="refuse", visible=False,
                        label="If the word is already in the shared library")
    with gr.Group(visible=False, elem_id="library-confirm") as confirm:
        question = gr.Markdown()
        with gr.Row():
            yes = gr.Button("Yes, delete", variant="stop")
            no = gr.Button("Keep it")
    exported = gr.File(label="Exported file")
    report = gr.Textbox(label="Result")

    # 3. Wiring.
    pickers.view(table, rows)
    pickers.view(thumbs, gallery)
    pickers.view(token, all_tokens)
    pickers.after(refresh.click(list_library, None, table, api_name="library"))
    pickers.after(upload.upload(import_files, upload, [report, table], api_name="import_concepts"))
    export.click(export_concept, [token, fmt], exported, api_name="export_concept")
    pickers.after(rename.click(rename_concept, [token, new_name], [report, token], api_name="rename_concept"))
    delete.click(ask_delete, token, [confirm, question], api_visibility="private")
    deleted = yes.click(delete_concept, token, [report, table], api_name="delete_concept")
    deleted.then(lambda: gr.update(visible=False), None, confirm, api_visibility="private")
    pickers.after(deleted)
    no.click(lambda: gr.update(visible=False), None, confirm, api_visibility="private")
    pickers.after(keep.click(save_to_library, [token, if_taken], report, api_name="save_concept"))
    keep.click(ask_if_taken, token, [taken, taken_question], api_visibility="private")
    for button, choice in ((replace, "replace"), (keep_both, "keep both")):
        chosen = button.click(save_as(choice), token, report, api_visibility="private")
        chosen.then(lambda: gr.update(visible=False), None, taken, api_visibility="private")
        pickers.after(chosen)
    keep_theirs.click(lambda: gr.update(visible=False), None, taken, api_visibility="private")
    preview.click(preview_concept, token, thumbs, api_name="preview_concept", concurrency_id="gpu")
    token.change(show, token, info, api_visibility="private")
    table.select(pick_row, None, token, api_visibility="private")

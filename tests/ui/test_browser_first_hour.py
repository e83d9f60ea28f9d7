"""The newcomer's first hour in one real browser session on the demo model (issue 29): train a word (ti) and a
pivotal one, generate with each word alone, transfer a style onto an uploaded picture, compose the two words,
inpaint, save to the library, reload and find both again.

It fails on a grey or flat picture anywhere on the way (the pixels on screen are checked), on any Gradio error toast
(a generic "Error" with no message included), and on a trained word the Library lists as not fitting."""

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ui_server import ARTIFACTS, CHROMIUM, studio_page

REPO = Path(__file__).resolve().parents[2]
PICTURES = sorted((REPO / "assets" / "concepts" / "toy-plum").glob("*.png"))
pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian chromium is not installed"),
              pytest.mark.skipif(len(PICTURES) < 3, reason="the bundled toy-plum pictures are missing")]
TI, PIVOTAL = "<plum>", "<plum-piv>"
# The Library's rows: a word by its word, a pivotal concept by its LoRA's name (as `<lora:plum-piv:1>` writes it).
ROWS = {TI: "<plum>", PIVOTAL: "plum-piv"}

# Every toast Gradio shows (title and text), recorded as it appears: error toasts can be closed or time out before a
# check reads them. Runs again in the page after a reload.
RECORD_TOASTS = """
window.__toasts = [];
new MutationObserver(() => {
    for (const body of document.querySelectorAll('[data-testid="toast-body"]')) {
        if (body.dataset.seen) continue;
        body.dataset.seen = "1";
        const title = body.querySelector('.toast-title'), text = body.querySelector('[data-testid="toast-text"]');
        window.__toasts.push([title ? title.innerText.trim() : "", text ? text.innerText.trim() : ""]);
    }
}).observe(document, {childList: true, subtree: true});
"""


@pytest.fixture
def page(demo_model_dir, tmp_path):
    """A chromium page at 1400x900 on a fresh studio over the demo model and an empty shared library."""
    with studio_page(demo_model_dir, tmp_path / "lib", (1400, 900), init_script=RECORD_TOASTS) as page:
        yield page


def assert_not_flat(picture, what: str) -> None:
    """The picture's pixels on screen are not one flat colour (a grey bar, or a background shown instead)."""
    picture.scroll_into_view_if_needed()
    shown = np.asarray(Image.open(io.BytesIO(picture.screenshot())).convert("RGB")).astype(int)
    assert np.ptp(shown.reshape(-1, 3), axis=0).max() > 30, f"{what} shows as one flat colour"


def assert_no_error_toasts(page) -> None:
    """No Gradio toast titled Error (a gr.Error, or the generic one of an exception), none without a message, and no
    "No concept called <w>" warning (a trained word the prompt did not find)."""
    toasts = page.evaluate("() => window.__toasts")
    bad = [t for t in toasts if t[0].lower().startswith("error") or not t[1]
           or "something went wrong" in t[1].lower() or "no concept called" in t[1].lower()]
    assert not bad, f"error toasts: {bad}"


def results(page, gallery: str, button: str, count: int, what: str, timeout: float = 60000) -> None:
    """Click `button`, wait for `count` new pictures in `gallery`, all loaded, then check each is not flat and no
    error toast appeared."""
    from playwright.sync_api import expect

    pictures = page.locator(f"{gallery} img[src*='file=']")
    before = pictures.evaluate_all("imgs => imgs.map(i => i.src)")
    page.get_by_role("button", name=button, exact=True).click()
    page.wait_for_function("""([gallery, before, count]) => {
        const imgs = [...document.querySelectorAll(gallery + " img[src*='file=']")];
        if (window.__toasts.length) return true;  // a toast (an error?) instead of pictures: checked below
        return imgs.length === count && imgs.every(i => !before.includes(i.src) && i.complete && i.naturalWidth > 0)
            && !document.querySelector(gallery + " .eta-bar, " + gallery + " .wrap.translucent");
    }""", arg=[gallery, before, count], timeout=timeout)
    assert_no_error_toasts(page)
    expect(pictures).to_have_count(count)
    for k in range(count):
        assert_not_flat(pictures.nth(k), f"{what} picture {k + 1}")
    assert_no_error_toasts(page)


def train(page, word: str, method: str, steps: int) -> None:
    """Train `word` on the toy-plum pictures with `method`, few steps; the preview and status come back whole."""
    from playwright.sync_api import expect

    from test_browser import set_slider

    page.get_by_role("tab", name="Train").click()
    page.get_by_label("New word").fill(word)
    page.get_by_label("Method (what learns)").click()
    page.get_by_role("option", name=re.compile(f"^{method}:")).click()
    expect(page.locator("#train-method input")).to_have_value(re.compile(f"^{method}:"))
    for slider, value in (("#train-steps", str(steps)), ("#train-preview-every", str(steps // 2))):
        set_slider(page, slider, value)
    page.get_by_role("button", name="Train", exact=True).click()
    expect(page.locator("#train-status textarea")).to_have_value(re.compile(re.escape(word[1:-1]) + r"(:1)?> is ready"),
                                                                 timeout=120000)
    preview = page.locator("#train-previews img[src*='file=']").first
    expect(preview).to_be_visible(timeout=20000)
    assert_not_flat(preview, f"the training preview of {word}")
    assert_no_error_toasts(page)


def library_fits(page) -> dict[str, str]:
    """token -> the Library table's "fits" cell, as the page shows it."""
    table = page.locator("#library-table")
    rows = [[cell.strip() for cell in row.get_by_role("gridcell").all_inner_texts()]
            for row in table.get_by_role("row").all()]
    return {row[0]: row[2] for row in rows if len(row) > 2}


def assert_both_fit(page) -> None:
    """The Library lists both trained concepts as fitting the loaded model (generation uses them)."""
    fits = library_fits(page)
    assert all(fits.get(ROWS[word], "").lower() == "true" for word in (TI, PIVOTAL)), fits


def test_a_newcomers_first_hour_in_one_browser_session(page, tmp_path):
    from playwright.sync_api import expect

    page.locator("#generate-results").wait_for(timeout=20000)
    # Train tab: pictures once, then a ti word and a pivotal one.
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-pictures input[type=file]").set_input_files([str(p) for p in PICTURES[:3]])
    expect(page.locator("#train-pictures").get_by_role("button", name="Remove this file")).to_have_count(
        3, timeout=20000)
    page.get_by_text("Advanced").click()
    train(page, TI, "ti", 8)
    train(page, PIVOTAL, "pivotal", 6)

    # The Library lists both as fitting the model (generation uses them).
    page.get_by_role("tab", name="Library").click()
    expect(page.locator("#library-table")).to_contain_text(ROWS[PIVOTAL], timeout=20000)
    assert_both_fit(page)

    # Generate with each word alone: pictures, no "No concept called ..." and no error.
    page.get_by_role("tab", name="Generate").click()
    page.get_by_label("Steps").first.fill("4")
    for word in (TI, PIVOTAL):
        page.get_by_label("Prompt", exact=True).first.fill(f"{word} on a black background")
        results(page, "#generate-results", "Generate", 4, f"generating {word}")
        page.screenshot(path=str(ARTIFACTS / f"first-hour-generate-{word.strip('<>')}.png"))

    # Style transfer onto an uploaded picture.
    content = np.full((64, 64, 3), 240, np.uint8)
    content[16:48, 16:48] = (200, 40, 40)
    Image.fromarray(content).save(tmp_path / "content.png")
    page.get_by_role("tab", name="Style transfer").click()
    page.locator("#style-content input[type=file]").set_input_files(str(tmp_path / "content.png"))
    expect(page.locator("#style-content img").first).to_be_visible(timeout=20000)
    page.get_by_label("Prompt", exact=True).nth(1).fill(f"a picture in the style of {TI}")
    results(page, "#style-result", "Transfer style", 2, "style transfer")

    # Compose the two words.
    page.get_by_role("tab", name="Compose").click()
    for label, word in (("Concept A", TI), ("Concept B", PIVOTAL)):
        box = page.get_by_label(label)
        box.fill(word)
        box.press("Enter")
    page.get_by_label("Template").fill("a {A} next to a {B}")
    results(page, "#compose-grid", "Compose", 4, "composition")

    # Inpaint: upload, brush over the middle, redraw.
    page.get_by_role("tab", name="Inpaint").click()
    editor = page.locator("#inpaint-editor")
    with page.expect_file_chooser() as chooser:
        editor.get_by_role("button", name="Upload", exact=True).click()
    chooser.value.set_files(str(PICTURES[0]))
    expect(editor.get_by_text("Upload an image")).to_be_hidden(timeout=20000)
    editor.get_by_role("button", name="Brush", exact=True).click()
    box = editor.locator("canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.45)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.55, steps=8)
    page.mouse.up()
    results(page, "#inpaint-result", "Inpaint", 2, "inpainting")

    # Save both to the shared library, reload, and find them again (still fitting).
    page.get_by_role("tab", name="Library").click()
    for word in (TI, PIVOTAL):
        page.get_by_label("Concept", exact=True).fill(ROWS[word])
        page.get_by_label("Concept", exact=True).press("Enter")
        page.get_by_role("button", name="Save to the shared library").click()
        expect(page.locator("#library-table")).to_contain_text(f"{word.strip('<>')}.safetensors", timeout=20000)
    assert_no_error_toasts(page)
    page.reload()
    page.get_by_role("tab", name="Library").click()
    for word in (TI, PIVOTAL):
        expect(page.locator("#library-table")).to_contain_text(ROWS[word], timeout=20000)
    assert_both_fit(page)
    page.screenshot(path=str(ARTIFACTS / "first-hour-library.png"))
    assert_no_error_toasts(page)

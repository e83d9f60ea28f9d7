"""The demo model's 64-px pictures, seen in a real browser at 1400x900: whole, scaled up, sharp, none cut off.

Guards the grey bars and blurs of issue 29 (3): a 64-px result smoothed into a blur or drawn larger than its frame
(only background shows), the fourth result cut off, the uploaded content picture collapsed to a strip."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from studio.ui.tabs.library import HEADERS
from ui_server import ARTIFACTS, CHROMIUM, import_word, studio_page

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian chromium is not installed")]
HEADERS_WORDS = {word for header in HEADERS for word in header.split()}
SMALLEST_SHOWN_PX = 128  # a 64-px picture drawn at least twice its size


@pytest.fixture
def page(demo_model_dir, tmp_path):
    """A chromium page at 1400x900 on a fresh studio over the demo model (it draws 64-px pictures)."""
    with studio_page(demo_model_dir, tmp_path / "lib", (1400, 900)) as page:
        yield page


def assert_shown_whole_and_sharp(picture, frame) -> None:
    """`picture` (an img) is drawn at least SMALLEST_SHOWN_PX wide, whole inside `frame`, with nearest-neighbour,
    and its pixels on screen are not one flat colour (the background of a picture drawn larger than its frame)."""
    box, outer = picture.bounding_box(), frame.bounding_box()
    assert box["width"] >= SMALLEST_SHOWN_PX and box["height"] >= SMALLEST_SHOWN_PX, box
    assert box["x"] >= outer["x"] - 1 and box["x"] + box["width"] <= outer["x"] + outer["width"] + 1, (box, outer)
    assert box["y"] >= outer["y"] - 1 and box["y"] + box["height"] <= outer["y"] + outer["height"] + 1, (box, outer)
    rendering = picture.evaluate("img => [getComputedStyle(img).imageRendering, getComputedStyle(img).objectFit]")
    assert rendering == ["pixelated", "contain"], rendering
    shown = np.asarray(Image.open(io.BytesIO(picture.screenshot())).convert("RGB")).astype(int)
    assert np.ptp(shown.reshape(-1, 3), axis=0).max() > 30, "the picture shows as one flat colour"


@pytest.mark.slow
def test_four_demo_results_fit_the_gallery_whole_and_sharp(page):
    from playwright.sync_api import expect

    page.get_by_label("Steps").first.fill("2")
    page.get_by_role("button", name="Generate").click()
    pictures = page.locator("#generate-results img[src*='file=']")
    expect(pictures).to_have_count(4, timeout=60000)
    page.screenshot(path=str(ARTIFACTS / "pictures-generate.png"))
    for k in range(4):
        assert_shown_whole_and_sharp(pictures.nth(k), page.locator("#generate-results"))


@pytest.mark.slow
def test_uploaded_content_picture_is_shown_large_and_the_brush_fits_the_picture(page, tmp_path):
    from playwright.sync_api import expect

    arr = np.full((64, 64, 3), 240, np.uint8)
    arr[16:48, 16:48] = (200, 40, 40)
    Image.fromarray(arr).save(tmp_path / "small.png")
    page.get_by_role("tab", name="Style transfer").click()
    page.locator("#style-content input[type=file]").set_input_files(str(tmp_path / "small.png"))
    content = page.locator("#style-content img").first
    expect(content).to_be_visible(timeout=20000)
    page.screenshot(path=str(ARTIFACTS / "pictures-style.png"))
    assert_shown_whole_and_sharp(content, page.locator("#style-content"))

    # The brush starts at 1/16 of the model's side: 4 px on a 64-px picture, not Gradio's 25.
    config = page.evaluate("() => window.gradio_config")
    editor = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "inpaint-editor")
    assert editor["props"]["brush"]["default_size"] == 4


WORD_LINES = """table => [...table.querySelectorAll('th')].flatMap(th => {
    const words = [], walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
        const text = walker.currentNode;
        for (const match of text.textContent.matchAll(/\\S+/g)) {
            const range = document.createRange();
            range.setStart(text, match.index);
            range.setEnd(text, match.index + match[0].length);
            words.push([match[0], new Set([...range.getClientRects()].map(r => Math.round(r.top))).size]);
        }
    }
    return words;
})"""


@pytest.mark.slow
def test_library_headers_wrap_between_words_only(page):
    """Guards "vector s": a header word broken over two lines at a 1400-px window."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Library").click()
    table = page.locator("#library-table table").first
    expect(table).to_be_visible(timeout=10000)
    words = table.evaluate(WORD_LINES)
    assert {"vectors", "token", "source"} <= {word for word, _ in words}, words
    assert all(lines == 1 for word, lines in words if word in HEADERS_WORDS), words


@pytest.mark.slow
def test_library_thumbnail_is_shown_whole_and_sharp(page, tmp_path):
    """Guards the Library's thumbnail drawn far larger than its 180-px frame, so only background shows."""
    from playwright.sync_api import expect

    import_word(page, "<thumb>", 128, tmp_path / "thumb", seed=0)
    page.get_by_role("button", name="Make a thumbnail").click()
    thumbnail = page.locator("#library-thumbs img[src*='file=']").first
    expect(thumbnail).to_be_visible(timeout=60000)
    page.screenshot(path=str(ARTIFACTS / "pictures-library.png"))
    assert_shown_whole_and_sharp(thumbnail, page.locator("#library-thumbs"))


@pytest.mark.slow
def test_train_preview_is_shown_whole_and_sharp(page, concept_pictures):
    """Guards the Train tab's "Latest preview": a 64-px picture drawn at 580 px in a 200-px frame (a grey bar)."""
    from playwright.sync_api import expect

    from test_browser import set_slider

    page.get_by_role("tab", name="Train").click()
    page.locator("#train-pictures input[type=file]").set_input_files(concept_pictures)
    expect(page.locator("#train-pictures").get_by_role("button", name="Remove this file")).to_have_count(3,
                                                                                                        timeout=20000)
    page.get_by_text("Advanced").click()
    for slider, value in (("#train-steps", "4"), ("#train-preview-every", "2")):
        set_slider(page, slider, value)
    page.get_by_role("button", name="Train", exact=True).click()
    preview = page.locator("#train-previews img[src*='file=']").first
    expect(preview).to_be_visible(timeout=120000)
    preview.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "pictures-train.png"))
    assert_shown_whole_and_sharp(preview, page.locator("#train-previews"))

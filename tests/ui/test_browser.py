"""A real browser (Debian's chromium through Playwright) clicks through the studio and sees pictures appear."""

import re
import shutil

import pytest

from ui_server import ARTIFACTS, CHROMIUM, import_word, studio_page

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian chromium is not installed")]


@pytest.fixture
def page(tiny_model_dirs, tmp_path):
    """A chromium page (1280x1100) open on a fresh studio over the tiny SD1 model and an empty library."""
    with studio_page(tiny_model_dirs["sd1"], tmp_path / "lib", (1280, 1100)) as page:
        yield page


def set_slider(page, slider: str, value: str) -> None:
    """Type `value` into a slider's number box until the slider shows it: a value typed while the page is still
    settling can be reset by it, so it is typed again (the wait is on the slider's value, not a clock)."""
    from playwright.sync_api import expect

    box, track = page.locator(f"{slider} input[type=number]"), page.locator(f"{slider} input[type=range]")
    for _ in range(3):
        box.fill(value)
        box.press("Enter")
        box.blur()
        try:
            expect(track).to_have_value(value, timeout=3000)
            break
        except AssertionError:
            continue
    expect(track).to_have_value(value)  # the slider took it


def test_generate_by_clicking_shows_a_picture_in_the_gallery(page):
    page.get_by_label("Prompt", exact=True).first.fill("a red circle")
    page.get_by_label("Steps").first.fill("2")
    page.get_by_role("button", name="Generate").click()
    page.locator("img[src*='file=']").or_(page.locator(".gallery img, [data-testid='gallery'] img")).first.wait_for(timeout=60000)
    page.screenshot(path=str(ARTIFACTS / "generate.png"))
    from playwright.sync_api import expect

    # What each tab must show once it is open: its main control (a button only that tab has).
    shows = {"Train": "Train", "Style transfer": "Transfer style", "Compose": "Compose", "Inpaint": "Inpaint",
             "Library": "Save to the shared library", "Evaluate": "Evaluate", "Model": "Load"}
    for tab, button in shows.items():
        page.get_by_role("tab", name=tab).click()
        expect(page.get_by_role("button", name=button, exact=True).first).to_be_visible(timeout=10000)
        page.screenshot(path=str(ARTIFACTS / f"{tab.lower().replace(' ', '-')}.png"))
    expect(page.get_by_text("The built-in demo model is loaded").or_(page.get_by_text("Loaded:")).first).to_be_visible()


def test_train_by_clicking_draws_the_loss_and_fills_the_concept_pickers(page, concept_pictures):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    page.locator("#train-pictures input[type=file]").set_input_files(concept_pictures)
    uploaded = page.locator("#train-pictures").get_by_role("button", name="Remove this file")
    expect(uploaded).to_have_count(3, timeout=20000)
    page.get_by_text("Advanced").click()
    for slider, value in (("#train-steps", "8"), ("#train-preview-every", "4")):
        set_slider(page, slider, value)
    page.get_by_role("button", name="Train", exact=True).click()
    expect(page.locator("#train-status textarea")).to_have_value(re.compile("is ready"), timeout=60000)
    page.locator("#train-previews img").first.wait_for(timeout=10000)  # drawn by the timer's poll
    expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible(timeout=10000)
    # Guards the 64 px preview cropped to a grey strip: whole picture, scaled up with nearest-neighbour.
    style = page.locator("#train-previews img").first.evaluate(
        "img => [getComputedStyle(img).imageRendering, getComputedStyle(img).objectFit]")
    assert style == ["pixelated", "contain"], style
    page.screenshot(path=str(ARTIFACTS / "train-done.png"))

    page.get_by_role("tab", name="Generate").click()
    page.get_by_label("Insert a concept").first.click()
    expect(page.get_by_role("option", name="<my-concept>")).to_be_visible(timeout=10000)


def test_library_shows_why_a_file_does_not_fit_and_deletes_only_after_confirming(page, tmp_path):
    import torch
    from playwright.sync_api import expect

    from studio.engine.learned.registry import save_concept
    from studio.engine.learned.word import Concept

    files = [str(save_concept(Concept(token, {"text_encoder": torch.zeros(1, width)}, {}), tmp_path / name))
             for token, width, name in (("<fits>", 768, "fits"), ("<too-wide>", 1024, "too-wide"))]
    page.get_by_role("tab", name="Library").click()
    page.locator("#library-import input[type=file]").set_input_files(files)
    table = page.locator("#library-table")
    expect(table).to_contain_text("<too-wide>", timeout=20000)
    expect(table).to_contain_text("but the model is")  # the reason, in the row of the file that does not fit

    page.get_by_label("Concept", exact=True).fill("<too-wide>")
    page.get_by_label("Concept", exact=True).press("Enter")
    expect(page.locator("#library-info")).to_contain_text("Does not fit: session concept '<too-wide>'")
    page.get_by_label("Concept", exact=True).fill("<fits>")
    page.get_by_label("Concept", exact=True).press("Enter")
    page.get_by_role("button", name="Delete…").click()
    expect(page.locator("#library-confirm").first).to_contain_text("Delete <fits>?")
    page.screenshot(path=str(ARTIFACTS / "library-confirm.png"))
    expect(table).to_contain_text("<fits>")  # nothing is deleted before the confirmation
    page.get_by_role("button", name="Yes, delete").click()
    expect(table).not_to_contain_text("<fits>", timeout=10000)
    expect(page.locator("#library-confirm").first).to_be_hidden()

    page.get_by_label("Concept", exact=True).fill("<ghost>")
    page.get_by_label("Concept", exact=True).press("Enter")
    page.get_by_role("button", name="Delete…").click()
    # The error names the word: Gradio renders error text as HTML, where <ghost> would vanish as a tag.
    expect(page.get_by_test_id("toast-body").first).to_contain_text("No concept named '<ghost>'")


def test_session_concepts_outlive_a_page_reload_and_no_other_browser_sees_them(page, tmp_path):
    """Guards 'a page reload drops every concept trained in that browser session, without a warning': the browser
    keeps its session id (localStorage), the server its concepts; a second browser (its own storage) has its own."""
    import torch
    from playwright.sync_api import expect

    from studio.engine.learned.registry import save_concept
    from studio.engine.learned.word import Concept

    file = save_concept(Concept("<kept>", {"text_encoder": torch.zeros(1, 768)}, {}), tmp_path / "kept")
    page.get_by_role("tab", name="Library").click()
    page.locator("#library-import input[type=file]").set_input_files([str(file)])
    table = page.locator("#library-table")
    expect(table).to_contain_text("<kept>", timeout=20000)
    page.reload()
    page.get_by_role("tab", name="Library").click()
    expect(page.locator("#library-table")).to_contain_text("<kept>", timeout=20000)

    other = page.context.browser.new_context().new_page()  # another browser profile: storage of its own
    other.goto(page.url)
    other.get_by_role("tab", name="Library").click()
    other.get_by_role("button", name="Refresh").click()
    expect(other.locator("#library-table")).to_contain_text("token", timeout=20000)
    expect(other.locator("#library-table")).not_to_contain_text("<kept>")


def test_cancel_in_the_browser_ends_with_a_final_line_and_the_vectors_so_far(page, concept_pictures):
    """Guards 'Train -> Cancel leaves the status at step 37/300 · about 35s left with no final line and no
    download': the cancelled run's last line and its file arrive once it has stopped."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    page.locator("#train-pictures input[type=file]").set_input_files(concept_pictures)
    expect(page.locator("#train-pictures").get_by_role("button", name="Remove this file")).to_have_count(3,
                                                                                                        timeout=20000)
    page.get_by_text("Advanced").click()
    set_slider(page, "#train-steps", "2000")  # the studio's limit on this model
    page.get_by_role("button", name="Train", exact=True).click()
    status = page.locator("#train-status textarea")
    expect(status).to_have_value(re.compile(r"step \d+/2000"), timeout=60000)  # running
    page.get_by_role("button", name="Cancel").click()
    expect(status).to_have_value(re.compile(r"^cancelled; .*\nWhat it learned by step \d+ is kept as <my-concept>",
                                                 re.S | re.M), timeout=60000)
    expect(page.locator("#train-result")).to_contain_text(re.compile(r"my-concept\s*\.safetensors"), timeout=10000)
    expect(page.locator("#train-loss")).not_to_contain_text("No data", timeout=10000)  # the curve up to the cancel
    page.screenshot(path=str(ARTIFACTS / "train-cancelled.png"))


def test_saving_a_word_another_browser_saved_asks_and_keep_both_keeps_both(page, tmp_path):
    """Guards the silent overwrite in the browser: the page asks (replace / keep both) instead of replacing."""
    from playwright.sync_api import expect

    def import_and_save(p, seed: int) -> None:
        import_word(p, "<dup>", 768, tmp_path / f"{seed}" / "dup", seed)
        p.get_by_role("button", name="Save to the shared library").click()

    import_and_save(page, 1)
    expect(page.locator("#library-table")).to_contain_text("dup.safetensors", timeout=20000)
    other = page.context.browser.new_context().new_page()
    other.goto(page.url)
    import_and_save(other, 2)
    question = other.locator("#library-taken").first
    expect(question).to_contain_text("<dup> is already in the shared library (dup.safetensors)", timeout=20000)
    other.screenshot(path=str(ARTIFACTS / "library-taken.png"))
    other.get_by_role("button", name="Keep both").click()
    expect(other.locator("#library-table")).to_contain_text("dup-2.safetensors", timeout=20000)
    expect(other.locator("#library-table")).to_contain_text("dup.safetensors")
    expect(question).to_be_hidden()

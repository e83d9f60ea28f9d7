"""A real browser (Debian's chromium through Playwright) clicks through the studio and sees pictures appear."""

import shutil
from pathlib import Path

import pytest

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import build_app
from ui_server import launch

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian chromium is not installed")]


def test_generate_by_clicking_shows_a_picture_in_the_gallery(tiny_model_dirs, tmp_path):
    from playwright.sync_api import sync_playwright

    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    app = build_app(manager, ConceptLibrary(tmp_path / "lib"))
    url = launch(app)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.get_by_label("Prompt", exact=True).first.fill("a red circle")
            page.get_by_label("Steps").first.fill("2")
            page.get_by_role("button", name="Generate").click()
            page.locator("img[src*='file=']").or_(page.locator(".gallery img, [data-testid='gallery'] img")).first.wait_for(timeout=60000)
            page.screenshot(path=str(ARTIFACTS / "generate.png"))
            for tab in ("Train", "Inpaint", "Library", "Model"):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(300)
                page.screenshot(path=str(ARTIFACTS / f"{tab.lower()}.png"))
            browser.close()
    finally:
        app.close()

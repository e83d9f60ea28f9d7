"""Concept pickers: every dropdown that offers concepts, refreshed together whenever the concepts change.

A picker lists every kind alike (words, per-layer words, LoRA files, word+LoRA files from pivotal tuning) that fits
the loaded model by the checks a request makes; its value is what goes into the prompt: the word (a pivotal file's
word, which brings its LoRA) or A1111's `<lora:name:1>` tag (`Studio.concept_choices`).

Tabs create their dropdowns through `ConceptPickers.dropdown` and hand over the events that change the concepts
(train, import, rename, delete, loading another model) with `after`; `wire` then chains one refresh after each of
those events, so a concept trained in one tab shows up at once in the pickers of every other tab.
"""

from __future__ import annotations

from typing import Callable

import gradio as gr

from studio.ui.state import Studio


class ConceptPickers:
    """Registry of the concept dropdowns (and other views of the concept list) of one studio app."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio
        self.dropdowns: list[gr.Dropdown] = []
        self.views: list[tuple[Callable[[str], object], gr.components.Component]] = []
        self.triggers: list = []

    def dropdown(self, label: str, *, custom: bool = False, **kwargs) -> gr.Dropdown:
        """A concept dropdown. `custom=True`: any word may be typed too (e.g. a plain word like `red`)."""
        dropdown = gr.Dropdown(label=label, choices=[], allow_custom_value=custom, **kwargs)
        self.dropdowns.append(dropdown)
        return dropdown

    def view(self, component: gr.components.Component, render: Callable[[str], object]) -> None:
        """Another view of the concept list (a table, thumbnails): `render(session)` gives its new value."""
        self.views.append((render, component))

    def after(self, event) -> None:
        """Refresh every picker and view after `event` (the value of `.click(...)`, `.upload(...)`, ...)."""
        self.triggers.append(event)

    def refresh(self, request: gr.Request) -> list:
        """New choices for every dropdown (their values stay) and new values for every view."""
        session = self.studio.session_of(request)
        choices = self.studio.concept_choices(session)
        return [gr.update(choices=choices) for _ in self.dropdowns] + [render(session) for render, _ in self.views]

    def wire(self, page_loaded) -> None:
        """Chain the refresh after every registered event and after `page_loaded` (the load event that ties the page
        to its session); call once, after all tabs are built."""
        outputs = self.dropdowns + [component for _, component in self.views]
        for event in self.triggers + [page_loaded]:
            event.then(self.refresh, None, outputs, api_visibility="private", show_progress="hidden")

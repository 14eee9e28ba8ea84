"""The step's Metaflow card as the pipeline's `Card`: what a stage shows, appended as card components.

The library never imports Metaflow; the flow hands each stage one of these around `current.card`.
"""

from __future__ import annotations

from typing import Any

from metaflow.cards import Image, Markdown


class StepCard:
    def __init__(self, card: Any):
        self._card = card  # metaflow's current.card

    def markdown(self, text: str) -> None:
        self._card.append(Markdown(text))

    def figure(self, fig: Any) -> None:
        self._card.append(Image.from_matplotlib(fig))

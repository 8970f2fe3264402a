"""Backbone sizes by name: the official HSTU configurations of each data set the HSTU paper
reports (facebookresearch/generative-recommenders, ``configs/<data set>/hstu-sampled-softmax-
n*-final.gin`` and ``*-large-final.gin``), so that someone with one of those data sets trains the
published shape by name (``persrec train --shape ml-20m``) rather than by six flags.

A shape is sizes (window, width, blocks, heads, dropout) plus the recipe settings in which that
config differs from the ML-1M one the recipes follow (``models.recipe``): Amazon Books uses 512
negatives and 201 epochs. The official configs give one dropout rate to the embeddings and
another to the blocks' outputs, always equal; ours is one rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    max_len: int
    dim: int  # item embedding width
    layers: int  # HSTU blocks
    heads: int
    head_dim: int  # dqk = dv
    dropout: float
    recipe_sets: tuple[str, ...] = ()  # "key=value" recipe settings (``recipe_named``'s ``sets``)

    def overridden(self, **sizes: int | float | None) -> Shape:
        """This shape with each of ``sizes`` that is not None instead of its own."""
        return dataclasses.replace(self, **{k: v for k, v in sizes.items() if v is not None})


_BOOKS = ("num_negatives=512", "epochs=201")
SHAPES: dict[str, Shape] = {
    "ml-1m": Shape(200, 50, 2, 1, 50, 0.2),  # the defaults
    "ml-1m-large": Shape(200, 50, 8, 2, 25, 0.2),
    "ml-20m": Shape(200, 256, 4, 4, 64, 0.2),
    "ml-20m-large": Shape(200, 256, 16, 8, 32, 0.2),
    "amzn-books": Shape(50, 64, 4, 4, 16, 0.5, _BOOKS),
    "amzn-books-large": Shape(50, 64, 16, 8, 8, 0.5, _BOOKS),
}
DEFAULT_SHAPE = "ml-1m"


def shape_named(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
    return SHAPES[name]

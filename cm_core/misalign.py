"""The vocabulary-misalignment setting: a user whose label names do not say what they mean, and a model that
answers in its own words.

This is the case the paper is about (a user who says "Kopi O" where the model says "black coffee"). A dataset's
labels are renamed, as one user might name them, by one of two seeded, documented schemes:

- ``codes``: opaque codes (``"K-417"``): nothing in the name says what it means;
- ``nicknames``: two real words unrelated to any intent (``"cobalt geyser"``), drawn without replacement from
  :data:`COLOURS` × :data:`NOUNS` (colours and landforms: no dataset's label speaks of either).

The model's own vocabulary (its response set) stays the dataset's original label names: a model answering in its
own words can be right about the meaning and still never say the user's label, which only a memory bank of
(model answer, user label) pairs can map. The renaming is a bijection, so every method sees the same task.
"""
from __future__ import annotations

import random
from typing import Sequence

from .data import Dataset, Example
from .errors import CMError

SCHEMES = ("codes", "nicknames")
RENAME_SEED = 0  # one fixed renaming per scheme: every report of the setting names the labels the same way

COLOURS = ("amber", "azure", "cobalt", "coral", "crimson", "indigo", "ivory", "jade", "maroon", "ochre", "olive",
           "saffron", "scarlet", "silver", "teal", "violet")
NOUNS = ("basalt", "canyon", "comet", "delta", "dune", "fjord", "geyser", "glacier", "granite", "lagoon", "mesa",
         "meteor", "nebula", "quartz", "reef", "tundra")
_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels: a code never spells a word


def rename_map(labels: Sequence[str], scheme: str, seed: int = RENAME_SEED) -> dict[str, str]:
    """Original label -> the user's name for it, one-to-one, the same for the same labels, scheme and seed."""
    if scheme not in SCHEMES:
        raise CMError(f"unknown renaming {scheme!r}; schemes: {', '.join(SCHEMES)}")
    labels = sorted(dict.fromkeys(labels))
    rng = random.Random(f"{scheme}:{seed}")  # str seeds are stable across Python versions and processes
    if scheme == "codes":
        pool = [f"{a}-{n}" for a in _LETTERS for n in range(100, 1000)]
    else:
        pool = [f"{c} {n}" for c in COLOURS for n in NOUNS]
    if len(labels) > len(pool):
        raise CMError(f"{len(labels)} labels: the {scheme} renaming names at most {len(pool)}")
    return dict(zip(labels, rng.sample(pool, len(labels))))


def misaligned(ds: Dataset, scheme: str, seed: int = RENAME_SEED) -> tuple[Dataset, list[str]]:
    """``ds`` with its labels renamed to the user's names, and the model's response set (the original names)."""
    names = rename_map(ds.labels, scheme, seed)
    rows = [Example(e.text, names[e.label]) for e in ds.examples]
    renamed = Dataset(f"{ds.name}:{scheme}", rows, sorted(names[label] for label in ds.labels), ds.source)
    return renamed, list(ds.labels)

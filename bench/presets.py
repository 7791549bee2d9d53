"""The named sweeps of ``layerpass bench``: ``default`` (what ``make bench`` runs), ``quick`` and ``full``.

A preset is a list of groups, each the product models x layers x modes; groups run in this order
(the acceptance rows first), layer counts increasing within a group, so a (model, mode) that hung
at a small layer count can skip its larger ones.
"""

from __future__ import annotations

from .measure import MODES

Unit = tuple[str, int, str]  # one row: (model, layers, mode)
Group = tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]  # models x layers x modes

PRESETS: dict[str, tuple[Group, ...]] = {
    # llama's depth curve, both compilers; the other dense/MoE models at both ends; the two
    # comparison modes where they are cheap (regional already fails from 8 layers on).
    "default": ((("llama",), (2, 8, 32, 80), ("layerpass", "inductor")),
                (("llama-fp8", "moe"), (2, 80), ("layerpass", "inductor")),
                (("llama",), (2, 8), ("layerpass-str", "regional"))),
    # the fewest rows that give every llama acceptance ratio: depth-free means 80 vs 2 layers
    "quick": ((("llama",), (2, 80), ("layerpass", "inductor")),),
    "full": ((("llama", "llama-fp8", "moe"), (2, 8, 32, 80), MODES),),
}
PRESET_NAMES = tuple(PRESETS)


def _check(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESET_NAMES)}")


def preset_units(name: str) -> tuple[Unit, ...]:
    """The rows of a preset, in run order."""
    _check(name)
    units: list[Unit] = []
    for models, layers, modes in PRESETS[name]:
        for n in layers:
            units += [(m, n, mode) for m in models for mode in modes if (m, n, mode) not in units]
    return tuple(units)


def preset_axes(name: str) -> Group:
    """The models, layer counts and modes a custom sweep takes from a preset when not given.

    Modes: the preset's first group's (layerpass vs inductor; all four for ``full``)."""
    _check(name)
    groups = PRESETS[name]
    models = tuple(dict.fromkeys(m for g in groups for m in g[0]))
    layers = tuple(sorted({n for g in groups for n in g[1]}))
    return models, layers, groups[0][2]

"""One matplotlib style for mecref's figures: notebooks, diagnostics and benchmarks.

::

    from mecref.plotting import use_style
    use_style()                      # for a notebook or a script: set it once
    with style_context():            # for library code: only inside the block
        fig = Figure(); ...

The style makes figures readable at a glance and alike across the project: a colour-blind-safe
cycle (Okabe and Ito's palette), a light grid, no top or right spines, font sizes that stay
legible in a notebook cell and in a saved PNG, legends without frames, tight saved bounds.
What a style cannot do is the figure's own job: every axis gets a label with its unit
(``ax.set(xlabel="batch size m", ylabel="time (ms)")``), every figure with more than one curve a
legend.
"""
from __future__ import annotations

import matplotlib as mpl

__all__ = ["PALETTE", "STYLE", "use_style", "style_context"]

#: Okabe and Ito's colour-blind-safe palette (blue, vermillion, bluish green, orange,
#: reddish purple, sky blue, yellow, black), in the order the curves take them.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#E69F00",
           "#CC79A7", "#56B4E9", "#F0E442", "#000000")

#: The rcParams that :func:`use_style` sets.
STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.prop_cycle": mpl.cycler(color=list(PALETTE)),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "image.cmap": "viridis",
}


def use_style():
    """Set mecref's figure style (:data:`STYLE`) for every figure made after the call."""
    mpl.rcParams.update(STYLE)


def style_context():
    """A context manager that applies :data:`STYLE` inside its block and restores the
    previous settings after it (for library code that must not change global state)."""
    return mpl.rc_context(STYLE)

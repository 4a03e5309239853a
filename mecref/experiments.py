"""Experiment grids: run many (config, seed) cells, cache each finished run, summarise.

A *cell* is one :class:`mecref.train.TrainConfig` (given as a dict of the fields that differ
from the defaults) and one seed. ::

    configs = main_grid(epochs=6)                      # FP32, STE, DoReFa+PACT, LSQ, LSQ+,
    records = run_grid(configs, [0, 1, 2], "runs/main")  # MEC-Quant (exact, Taylor, MOE)
    rows = write_results("runs/main")                  # results.csv + results.json
    print(markdown_table(rows))

This module is the public entry of the grids: import every name of its ``__all__`` from here.
The code lives in four modules, one idea each:

========================  =====================================================================
:mod:`mecref.grids`       cells (full configuration, key, labels), MEC-Quant's forms and
                          settings, the main grid and the strength sweep
:mod:`mecref.gridcache`   the grid's folder: a cell trained into it (resuming its checkpoint),
                          its run file and ``grid.json`` written atomically and read back; how
                          cells are cached and resumed; the workers' environment
:mod:`mecref.gridrun`     :func:`run_grid`: the cells to run, in this process or in worker
                          processes (threads, stopping, progress); the time estimate
:mod:`mecref.summary`     rows per configuration, ``results.csv``/``.json``, the Markdown table,
                          the best settings of a sweep, the sweep's figure
========================  =====================================================================

This module adds :func:`run_table` (build a canonical grid, run it, write its results: the
``mecref table`` and ``mecref sweep`` commands) and :func:`model_from_checkpoint`.
``run_grid(..., client=)`` (a ``distributed.Client``) runs the cells on a Dask cluster instead,
with no shared filesystem: :mod:`mecref.cluster`, docs/cluster.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from .backend import MecrefError
from .gridcache import _write_json_atomic
from .gridrun import _dry_run, run_grid
from .grids import (BETA_GRID, EPS_GRID, FORMS, MAIN_BITS, bits_label, cell_config, cell_key,
                    default_settings, form_label, form_spec, group_key, main_grid, method_label,
                    pretrain_cell, quantizer_label, sweep_grid, taylor_eps)
from .summary import (best_row, best_settings, load_runs, markdown_table, plot_sweep,
                      settings_from_sweep, summarize, write_results)

# Also importable from here: names outside __all__ that other modules, scripts and tests
# take from mecref.experiments. Each lives in the module it is imported from, where the calls
# look it up: a test that patches one patches it there.
from .gridcache import _WORKER_ENV, _init_path, _run_cell  # noqa: F401
from .gridrun import estimate_seconds  # noqa: F401
from .grids import _check_bits_list, _digest  # noqa: F401

__all__ = [
    "quantizer_label", "cell_config", "cell_key", "group_key", "method_label", "bits_label",
    "run_grid", "load_runs", "summarize", "write_results", "markdown_table", "main_grid",
    "sweep_grid", "best_row", "best_settings", "settings_from_sweep", "default_settings", "taylor_eps", "plot_sweep",
    "run_table", "model_from_checkpoint", "MAIN_BITS", "FORMS", "EPS_GRID", "BETA_GRID",
    "form_label", "form_spec", "pretrain_cell",
]


# ----------------------------------------------------------------------------------------------
# One call for the CLI, and trained models back from their checkpoints
# ----------------------------------------------------------------------------------------------

def run_table(grid: str, seeds, out_dir, workers: int = 2, progress=True, dry_run=False,
              from_sweep=None, client=None, **grid_kwargs) -> str:
    """Build a canonical grid, run (or resume) it, write the results; return Markdown.

    ``grid`` is ``"main"`` (:func:`main_grid`) or ``"sweep"`` (:func:`sweep_grid`, which also
    writes ``sweep.png`` and ``best_settings.json``, and lists the best setting per form by
    validation accuracy); ``grid_kwargs`` go to the grid function. For the main grid,
    ``from_sweep`` names a sweep folder whose best settings (chosen on validation accuracy)
    the MEC-Quant rows use. ``dry_run`` lists the cells and which are cached, and trains nothing.
    ``client`` runs the cells on a Dask cluster (:func:`run_grid`); cells the cluster gave up
    on are listed under the table.
    """
    if grid not in ("main", "sweep"):
        raise MecrefError(f"grid must be 'main' or 'sweep', got {grid!r}")
    header = ""
    if from_sweep is not None:
        if grid != "main":
            raise MecrefError("from_sweep applies to the main grid only")
        settings = settings_from_sweep(from_sweep, grid_kwargs.get("settings"))
        grid_kwargs["settings"] = settings
        header = f"MEC-Quant settings from the sweep in {from_sweep}: {json.dumps(settings)}\n\n"
    configs = (main_grid if grid == "main" else sweep_grid)(**grid_kwargs)
    if dry_run:
        return header + _dry_run(configs, seeds, out_dir, workers)
    records = run_grid(configs, seeds, out_dir, workers=workers, progress=progress, client=client)
    rows = write_results(out_dir, configs)
    text = header + markdown_table(rows)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        text += "\n\n" + "\n".join(f"- FAILED (not cached; run again to retry): {r['bits']} "
                                    f"{r['label']} seed {r['seed']}: {r['error']}" for r in failed)
    if grid == "sweep":
        plot_sweep(rows, Path(out_dir, "sweep.png"))
        best = best_settings(rows)
        _write_json_atomic(Path(out_dir, "best_settings.json"), best)
        text += "\n\n" + "\n".join(
            f"- best {form} by validation accuracy: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in s.items())
            for form, s in best.items())
    return text


def model_from_checkpoint(path, backend: str = "numpy"):
    """Rebuild the small CNN saved in a training checkpoint (``last.npz``), in eval-ready state.

    Returns
    -------
    (model, meta) : the model with the checkpoint's parameters and buffers, and the
        checkpoint's metadata (``config``, ``model_config``, ``history``, ...).
    """
    from . import nn
    from .checkpoint import load_checkpoint
    state, _, meta = load_checkpoint(path)
    if not isinstance(meta.get("model_config"), dict):
        raise MecrefError(f"checkpoint {str(path)!r} has no model_config: not a training "
                          f"checkpoint")
    model = nn.small_cnn(**dict(meta["model_config"], backend=backend))
    model.load_state_dict(state)
    return model, meta

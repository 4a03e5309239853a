"""What a grid is made of: cells, their keys and labels, and the canonical grids.

A *cell* is one :class:`mecref.train.TrainConfig` (given as a dict of the fields that differ
from the defaults) and one seed: :func:`cell_config` is its full, validated configuration,
:func:`cell_key` the name of its run file (:mod:`mecref.gridcache`), :func:`group_key` the key
of the table row it is averaged in, and :func:`method_label` and :func:`bits_label` name it in
the tables. The canonical grids are :func:`main_grid` (every method at every bit-width, one
budget) and :func:`sweep_grid` (MEC-Quant's strength, judged on a validation split), built
from MEC-Quant's *forms* (:data:`FORMS`) and their settings. Used through
:mod:`mecref.experiments`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from itertools import product

from .backend import MecrefError
from .validate import check_int

__all__ = [
    "quantizer_label", "cell_config", "cell_key", "group_key", "pretrain_cell", "bits_label",
    "method_label", "MAIN_BITS", "FORMS", "EPS_GRID", "BETA_GRID", "form_label", "form_spec",
    "taylor_eps", "default_settings", "main_grid", "sweep_grid",
]


def quantizer_label(name) -> str:
    """``"FP32"`` or a registered scheme's label (``"LSQ"``, ``"DoReFa+PACT"``, ...)."""
    from . import schemes
    if name == "fp32":
        return "FP32"
    return schemes.REGISTRY[name].label if name in schemes.REGISTRY else str(name)


MAIN_BITS = ((4, 4), (3, 3), (2, 2), (2, 4))  # (weight bits, activation bits)
_KEY_DIGITS = 16


# ----------------------------------------------------------------------------------------------
# Cells: full configurations, keys and labels
# ----------------------------------------------------------------------------------------------

def cell_config(config: dict, seed: int) -> dict:
    """The full, validated configuration of one cell: every TrainConfig field, ``seed`` set.

    Parameters
    ----------
    config : dict
        TrainConfig fields (any subset) except ``seed``.
    seed : int >= 0

    Raises
    ------
    MecrefError
        ``config`` sets ``seed`` (seeds are given separately), or a field is invalid.
    TypeError
        ``config`` is not a dict or names an unknown field.
    """
    from .train import TrainConfig
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict of TrainConfig fields, got {type(config).__name__}")
    if "seed" in config:
        raise MecrefError(f"config must not set 'seed' (seeds are passed to the grid), got "
                          f"seed={config['seed']!r} in {config!r}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise TypeError(f"config names unknown TrainConfig fields {unknown}; known: {sorted(fields)}")
    check_int("seed", seed, 0)
    return TrainConfig(**dict(config, seed=int(seed))).validate().as_dict()


# Fields added to TrainConfig after the first cached grids, with the value that means "as
# before": a field at that value is left out of a cell's key, so earlier caches stay valid.
_NEUTRAL = {"pretrain_epochs": 0, "pretrain_lr": 0.1, "reg_at": "features"}


def _key_view(full: dict) -> dict:
    return {k: v for k, v in full.items() if not (k in _NEUTRAL and v == _NEUTRAL[k])}


def _digest(obj) -> str:
    text = json.dumps(_key_view(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_KEY_DIGITS]


def cell_key(config: dict, seed: int) -> str:
    """Stable file name of a cell: SHA-256 (16 hex digits) of its full configuration."""
    return _digest(cell_config(config, seed))


def group_key(full_config: dict) -> str:
    """Key of a cell's configuration without its seed: the cells averaged in one table row."""
    return _digest({k: v for k, v in full_config.items() if k != "seed"})


def pretrain_cell(full: dict) -> dict:
    """The full configuration of the FP32 run a cell with ``pretrain_epochs > 0`` starts from
    (:meth:`mecref.train.TrainConfig.pretrain_config`): one per seed and data setting, shared
    by every method of that seed."""
    from .train import TrainConfig
    return TrainConfig(**full).validate().pretrain_config().as_dict()


def bits_label(config: dict) -> str:
    """``"FP32"`` or ``"W<w>A<a>"`` (e.g. ``"W2A4"``: 2-bit weights, 4-bit activations)."""
    if config.get("quantizer") == "fp32":
        return "FP32"
    return f"W{config['w_bits']}A{config['a_bits']}"


def method_label(config: dict) -> str:
    """Human name of a configuration's method.

    ``"LSQ"`` + ``reg="mec"`` is ``"MEC-Quant (exact)"``; ``"mec_taylor"`` is
    ``"MEC-Quant (Taylor n=4)"``; ``"moe"`` is ``"MEC-Quant (MOE K=4)"``. A regulariser on another
    quantizer reads ``"STE + MEC (exact)"`` and so on.
    """
    from . import regularizers
    q = quantizer_label(config.get("quantizer"))
    reg = config.get("reg")
    if reg is None or config.get("reg_weight") == 0:
        return q
    form = regularizers.get(reg).describe(config)
    if config.get("reg_at", "features") != "features":
        form += f", at {config['reg_at']}"
    return f"MEC-Quant ({form})" if q == "LSQ" else f"{q} + MEC ({form})"


# ----------------------------------------------------------------------------------------------
# The canonical grids
# ----------------------------------------------------------------------------------------------

# A *form* of MEC-Quant is a registered regulariser with its structural parameters fixed (the
# Taylor order, the number of experts); its *settings* add the strength (reg_weight, eps).
# Forms are named by their label ("exact", "Taylor n=4", "MOE K=4").
FORMS = ({"reg": "mec"}, {"reg": "mec_taylor", "order": 4}, {"reg": "moe", "experts": 2},
         {"reg": "moe", "experts": 4}, {"reg": "moe", "experts": 8})
EPS_GRID = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
BETA_GRID = (0.05, 0.2, 1.0)


def form_label(config: dict) -> str:
    """A configuration's form: its regulariser's label (``"exact"``, ``"MOE K=4"``)."""
    from . import regularizers
    return regularizers.get(config["reg"]).describe(config)


def form_spec(config: dict) -> dict:
    """The regulariser fields of a configuration: ``reg``, ``reg_weight``, ``eps`` and the
    form's own parameters (``order``, ``experts``, ...)."""
    from . import regularizers
    return dict(reg=config["reg"], **regularizers.get(config["reg"]).settings(config))


def _full_form(form: dict) -> dict:
    """A form dict completed with TrainConfig's defaults (and checked)."""
    from . import regularizers
    from .train import TrainConfig
    if not isinstance(form, dict) or "reg" not in form:
        raise MecrefError(f"a form is a dict with 'reg' and its parameters, got {form!r}")
    reg = regularizers.get(form["reg"])
    allowed = {"reg", "reg_weight", "eps", "reg_at"} | set(reg.params)
    unknown = sorted(set(form) - allowed)
    if unknown:
        raise MecrefError(f"form {form!r} has keys {unknown} that {form['reg']!r} does not read; "
                          f"allowed: {sorted(allowed)}")
    d = TrainConfig()
    return dict({k: getattr(d, k) for k in ("reg_weight", "eps") + tuple(reg.params)}, **form)


def taylor_eps(width=None) -> float:
    r"""The smallest eps of the Taylor form's sweep: :math:`\sqrt d`, d = ``width[2]`` (8 for 64).

    The order-n series of :math:`\log\det(I + C)` converges only when the spectral radius of
    :math:`C = \lambda Z_1 Z_2^T` is below 1; for unit rows it is at most
    :math:`\lambda m = d / \epsilon^2` (derivations E4), so eps >= sqrt(d) keeps it at most 1
    for any features (equal to 1 only when every row of both views is the same vector). Below
    that the "form" would be a different polynomial objective, not an approximation.
    """
    from . import regularizers
    from .train import TrainConfig
    d = (TrainConfig().width if width is None else width)[2]
    return regularizers.get("mec_taylor").min_eps(d)


def default_settings(width=None) -> dict:
    """MEC-Quant's settings per default form before a sweep: TrainConfig's ``reg_weight`` and
    ``eps`` (at least the form's smallest defined eps), the form's own parameters from
    :data:`FORMS`. Keyed by form label."""
    from . import regularizers
    from .train import TrainConfig
    d = (TrainConfig().width if width is None else width)[2]
    out = {}
    for form in FORMS:
        spec = _full_form(form)
        lo = regularizers.get(spec["reg"]).min_eps
        if lo is not None:
            spec["eps"] = max(spec["eps"], lo(d))
        out[form_label(spec)] = spec
    return out


def _merge_settings(settings, width):
    """Settings keyed by form label; a key that is a registered regulariser's name (``"mec"``)
    means that regulariser with the parameters given (or its default form)."""
    from . import regularizers
    merged = default_settings(width)
    for key, values in (settings or {}).items():
        if not isinstance(values, dict):
            raise MecrefError(f"settings[{key!r}] must be a dict, got {values!r}")
        if key in regularizers.REGISTRY:
            base = next((s for s in merged.values() if s["reg"] == key), {"reg": key})
            spec = _full_form(dict(base, **values, reg=key))
            if form_label(spec) != form_label(base):  # a new form: drop the default one
                merged = {k: v for k, v in merged.items() if v is not base}
        elif key in merged:
            spec = _full_form(dict(merged[key], **values))
        else:
            raise MecrefError(f"settings has unknown form {key!r}; forms are {sorted(merged)} "
                              f"or a regulariser name {regularizers.names()}")
        merged[form_label(spec)] = spec
    return merged


def main_grid(epochs: int = 6, bits=MAIN_BITS, settings=None, forms=None, **common) -> list:
    """The main table's configurations: every method at every bit-width, one shared budget.

    FP32; then for each ``(w_bits, a_bits)`` in ``bits`` (W4A4, W3A3, W2A2, W2A4 by default):
    every registered scheme (STE, DoReFa+PACT, LSQ, LSQ+), and MEC-Quant = LSQ + the
    regulariser in each form.

    Every configuration gets the same ``epochs`` and ``common`` TrainConfig fields (batch size,
    schedule, data, ``pretrain_epochs`` for the standard protocol, ...), and the training loop
    gives every method the same two augmented views and data order, so the regulariser is the
    only difference between LSQ and MEC-Quant.

    Parameters
    ----------
    settings : dict, optional
        Per form label (``"exact"``, ``"Taylor n=4"``, ``"MOE K=4"``, ...; or a regulariser's
        name), its ``reg_weight``, ``eps`` and parameters: :func:`~mecref.summary.best_settings`
        of a sweep on a validation split, never the test set. Missing forms keep
        :func:`default_settings`.
    forms : list of str, optional
        The form labels to include (default: every form in the merged settings).

    Returns
    -------
    list of dict, each without ``seed``.
    """
    from . import schemes
    check_int("epochs", epochs, 1)
    base = dict(common, epochs=int(epochs))
    specs = _merge_settings(settings, common.get("width"))
    if forms is not None:
        missing = [f for f in forms if f not in specs]
        if missing:
            raise MecrefError(f"forms {missing} have no settings; known: {sorted(specs)}")
        specs = {f: specs[f] for f in forms}
    configs = [dict(base, quantizer="fp32", reg=None)]
    for w, a in _check_bits_list(bits):
        q = dict(base, w_bits=w, a_bits=a)
        configs += [dict(q, quantizer=name, reg=None) for name in schemes.names()]
        configs += [dict(q, quantizer="lsq", **spec) for spec in specs.values()]
    return configs


def _check_bits_list(bits):
    try:
        pairs = [(int(w), int(a)) for w, a in bits]
    except (TypeError, ValueError):
        raise MecrefError(f"bits must be a list of (w_bits, a_bits) pairs, got {bits!r}") from None
    if not pairs:
        raise MecrefError("bits must hold at least one (w_bits, a_bits) pair, got []")
    return pairs


def _check_list(name, vals):
    if isinstance(vals, (str, int, float)) or not len(vals):
        raise MecrefError(f"{name} must be a non-empty list, got {vals!r}")
    return list(vals)


def sweep_grid(epochs: int = 6, reg_weights=BETA_GRID, eps_values=EPS_GRID, forms=FORMS,
               w_bits: int = 2, a_bits: int = 2, val_size: int = 2000, **common) -> list:
    """The strength sweep of MEC-Quant (LSQ + regulariser), judged on a validation split.

    The LSQ baseline, then every form in ``forms`` over the SAME grid of ``reg_weights`` x
    ``eps_values``: eps sets the strength d/eps^2 = lam m of the coding length whatever the
    batch or expert size (docs/results.md, "Strength"). A form is left out at an eps below the
    smallest where it is defined (the Taylor series: eps >= sqrt(d), :func:`taylor_eps`).

    ``val_size`` images are held out of the training set (stratified, per seed) and every choice
    is made on their accuracy (``val_acc``); the test set is never looked at for a choice.

    Returns
    -------
    list of dict, each without ``seed``; no configuration twice
        (1 + 3 x (6 + 3 + 6 + 6 + 6) = 82 by default: exact, Taylor n=4 from eps 8, MOE K = 2,
        4, 8).
    """
    from . import regularizers
    from .train import TrainConfig
    check_int("epochs", epochs, 1)
    check_int("val_size", val_size, 1)
    reg_weights = [float(b) for b in _check_list("reg_weights", reg_weights)]
    eps_values = [float(e) for e in _check_list("eps_values", eps_values)]
    forms = [_full_form(f) for f in _check_list("forms", forms)]
    d = (common.get("width") or TrainConfig().width)[2]
    base = dict(common, epochs=int(epochs), quantizer="lsq", w_bits=w_bits, a_bits=a_bits,
                val_size=int(val_size))
    configs = [dict(base, reg=None)]
    for form in forms:
        lo = regularizers.get(form["reg"]).min_eps
        for b, e in product(reg_weights, eps_values):
            if lo is None or e >= lo(d):
                configs.append(dict(base, **dict(form, reg_weight=b, eps=e)))
    unique = {}
    for c in configs:
        unique.setdefault(json.dumps(c, sort_keys=True, default=list), c)
    return list(unique.values())

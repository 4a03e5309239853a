"""Diagnostics of learned features: spectrum, effective rank, coding length, class spread.

Everything works on host NumPy features ``Z`` of shape ``(m, d)`` (one sample per row), in
float64, with the rows l2-normalised first (as the regulariser sees them). A row of zeros has no
direction and cannot be normalised: the functions refuse it, and :func:`diagnose` drops such
rows (counting them) before measuring. Definitions and derivations: docs/derivations.md,
section D (D1 spectrum and effective rank, D2 coding length per sample, D3 class spread). ::

    Z, pred = collect_features(model, ds.x_test, ds.y_test)     # (N, d) penultimate features
    lam = feature_covariance_spectrum(Z)                         # (d,) descending
    effective_rank(lam)                                          # in [1, rank]
    coding_length_per_sample(Z, eps=0.5)                         # L(Z) / m, nats
    per_class_spread(Z, ds.y_test)["ratio"]                      # between / within

:func:`diagnose` trains (or finds cached) FP32, LSQ and MEC-Quant models at given bit-widths
with :func:`mecref.experiments.run_grid` and writes the plots and a JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import data as mdata
from . import entropy
from .backend import MecrefError, array_module, backend_name, to_host
from .validate import check_array, check_choice, check_int, check_positive

__all__ = ["unit_rows", "feature_covariance_spectrum", "effective_rank",
           "coding_length_per_sample", "per_class_spread", "collect_features",
           "plot_spectra", "plot_diagnostics", "diagnose", "markdown_diagnostics"]


def _host_features(name, Z):
    """A float64 host copy of an (m, d) feature array, validated."""
    if not hasattr(Z, "shape"):
        raise TypeError(f"{name} must be a numpy/cupy array, got {type(Z).__name__}")
    Z = np.asarray(to_host(Z))
    check_array(name, Z, ndim=2)
    return Z.astype(np.float64)


def unit_rows(Z, name: str = "Z") -> np.ndarray:
    r"""l2-normalised rows, :math:`z_i = u_i / \lVert u_i \rVert` (float64, host).

    Parameters
    ----------
    Z : array (m, d), floating, finite, no zero rows

    Raises
    ------
    MecrefError
        A zero row (it has no direction); the message names how many and the first.
    """
    U = _host_features(name, Z)
    r = np.sqrt(np.sum(U * U, axis=1))
    zero = np.flatnonzero(r == 0)
    if zero.size:
        raise MecrefError(f"{name} has {zero.size} zero row(s) (first: row {zero[0]}), which "
                          f"cannot be l2-normalised; drop them first")
    return U / r[:, None]


def feature_covariance_spectrum(Z, center: bool = True) -> np.ndarray:
    r"""Eigenvalues (descending) of the covariance of the l2-normalised rows (D1).

    .. math::

        \Sigma = \frac{1}{m} \sum_{i=1}^m (z_i - \bar z)(z_i - \bar z)^T \in \mathbb{R}^{d \times d},
        \qquad z_i = u_i / \lVert u_i \rVert,\quad \bar z = \frac{1}{m}\sum_i z_i

    (:math:`\bar z = 0` with ``center=False``; then :math:`\operatorname{tr}\Sigma = 1`).
    The eigenvalues are the squared singular values of the (centred) unit rows over
    :math:`\sqrt m`. Unit rows make :math:`\operatorname{tr}\Sigma \le 1`, so eigenvalues
    below :math:`d \cdot 2^{-52}` are round-off and are set to 0 (rows that all point the same
    way give an all-zero spectrum when centred, not noise).

    Parameters
    ----------
    Z : array (m, d)
    center : bool

    Returns
    -------
    ndarray (d,), float64, descending, >= 0
    """
    Zn = unit_rows(Z)
    if center:
        Zn = Zn - Zn.mean(axis=0)
    lam = np.linalg.eigvalsh(Zn.T @ Zn / Zn.shape[0])[::-1]
    lam[lam < Zn.shape[1] * np.finfo(np.float64).eps] = 0.0  # round-off (the trace is <= 1)
    return lam


def effective_rank(x, center: bool = True) -> float:
    r"""Effective rank (Roy & Vetterli 2007) of a spectrum or of a feature matrix (D1).

    .. math::

        p_k = \frac{\lambda_k}{\sum_j \lambda_j}, \qquad
        \operatorname{erank} = \exp\Big(-\sum_{k:\,p_k > 0} p_k \log p_k\Big)

    With a 1-D ``x`` the :math:`\lambda_k` are ``x`` (non-negative, not all zero). With a 2-D
    ``x`` = Z (m, d) they are :func:`feature_covariance_spectrum` ``(Z, center)``: Roy and
    Vetterli's effective rank of the covariance matrix (its singular values are its
    eigenvalues). It lies in [1, rank]: k equal eigenvalues give k, one non-zero gives 1.

    Returns
    -------
    float
    """
    if not hasattr(x, "shape"):
        x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        lam = feature_covariance_spectrum(x, center=center)
    else:
        lam = np.asarray(to_host(x), dtype=np.float64)
        check_array("spectrum", lam, ndim=1)
        if np.any(lam < 0):
            raise MecrefError(f"spectrum must be non-negative, got minimum {lam.min()!r}")
    total = lam.sum()
    if not total > 0:
        raise MecrefError("effective rank of an all-zero spectrum is undefined (the features "
                          "have no variance)")
    p = lam[lam > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def coding_length_per_sample(Z, eps: float) -> float:
    r"""Coding length of the unit rows per sample, :math:`L(Z;\epsilon) / m` in nats (D2).

    .. math::

        \frac{L}{m} = \frac{\mu}{m} \log\det\big(I_m + \lambda Z Z^T\big),\qquad
        \mu = \frac{m + d}{2},\quad \lambda = \frac{d}{m \epsilon^2}

    (:func:`mecref.entropy.coding_length`, derivations E1). In terms of the eigenvalues
    :math:`\lambda_k` of the uncentred covariance :math:`Z^T Z / m` of the unit rows (D2),
    :math:`L/m = \frac{m + d}{2m} \sum_k \log(1 + d \lambda_k / \epsilon^2)`: a soft effective
    rank that depends on m only through :math:`(m + d)/(2m)`; compare models at the same m and
    eps. Closed forms: m equal rows give :math:`\mu \log(1 + \lambda m) / m`; m <= d orthonormal
    rows give :math:`\mu \log(1 + \lambda)`.

    Parameters
    ----------
    Z : array (m, d), no zero rows
    eps : float > 0, distortion (not squared)
    """
    eps = check_positive("eps", eps)
    Zn = unit_rows(Z)
    L, _ = entropy.coding_length(Zn, eps, normalize=False)
    return float(L) / Zn.shape[0]


def per_class_spread(Z, y) -> dict:
    r"""Within-class and between-class spread of the unit rows (D3).

    With :math:`C_c = \{i : y_i = c\}`, :math:`m_c = |C_c|`, class means :math:`\mu_c` and the
    overall mean :math:`\bar z`:

    .. math::

        W_c = \frac{1}{m_c} \sum_{i \in C_c} \lVert z_i - \mu_c \rVert^2, \quad
        W = \sum_c \frac{m_c}{m} W_c, \quad
        B = \sum_c \frac{m_c}{m} \lVert \mu_c - \bar z \rVert^2, \quad
        T = \frac{1}{m} \sum_i \lVert z_i - \bar z \rVert^2 = W + B

    Parameters
    ----------
    Z : array (m, d), no zero rows
    y : integer array (m,)

    Returns
    -------
    dict
        ``classes`` (sorted labels present), ``counts`` and ``within`` (:math:`m_c`, :math:`W_c`
        per class), ``within_mean`` (W), ``between`` (B), ``total`` (T) and ``ratio`` = B / W
        (``inf`` when every class has collapsed to a point, W = 0).
    """
    Zn = unit_rows(Z)
    y = np.asarray(to_host(y)) if hasattr(y, "shape") else None
    if y is None or y.shape != (Zn.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise MecrefError(f"y must be an integer array of shape ({Zn.shape[0]},), got "
                          f"{getattr(y, 'dtype', None)} {getattr(y, 'shape', None)}")
    m = Zn.shape[0]
    zbar = Zn.mean(axis=0)
    classes, counts = np.unique(y, return_counts=True)
    within, between = [], 0.0
    for c, m_c in zip(classes, counts):
        Zc = Zn[y == c]
        mu_c = Zc.mean(axis=0)
        within.append(float(np.mean(np.sum((Zc - mu_c) ** 2, axis=1))))
        between += m_c / m * float(np.sum((mu_c - zbar) ** 2))
    W = float(np.dot(counts / m, within))
    T = float(np.mean(np.sum((Zn - zbar) ** 2, axis=1)))
    return dict(classes=classes.tolist(), counts=counts.tolist(), within=within, within_mean=W,
                between=between, total=T, ratio=between / W if W > 0 else float("inf"))


def collect_features(model, x_uint8, y, batch_size: int = 500):
    """Penultimate features and predictions of a model in eval mode (BatchNorm running stats).

    Parameters
    ----------
    model : the small CNN (``model.forward(x, train=False) -> (logits, features)``)
    x_uint8 : uint8 array (N, H, W); y : integer array (N,)
    batch_size : int, images per forward pass (the result does not depend on it)

    Returns
    -------
    Z : ndarray (N, d) float64, host
    pred : ndarray (N,) int64, host, the argmax class
    """
    batch_size = check_int("batch_size", batch_size, 1)
    _, layer, key = next(iter(model.named_params()))
    backend = backend_name(array_module(layer.params[key]))
    feats, preds = [], []
    in_order = np.random.default_rng(0)  # required by iterate_batches; unused without shuffle
    for xb, _ in mdata.iterate_batches(x_uint8, y, min(batch_size, len(x_uint8)), in_order,
                                       shuffle=False, drop_last=False, backend=backend):
        logits, f = model.forward(xb, train=False)
        feats.append(np.asarray(to_host(f), dtype=np.float64))
        preds.append(np.asarray(to_host(logits.argmax(axis=1)), dtype=np.int64))
    return np.concatenate(feats), np.concatenate(preds)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def _save(fig, path):
    from .checkpoint import write_atomic
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a new file renamed over the path: a symlink there is replaced, never written through
    write_atomic(path, lambda fh: fig.savefig(fh, dpi=120, format=path.suffix[1:] or "png"))
    return path


def plot_spectra(spectra: dict, path, title: str = "Feature covariance spectra"):
    """Eigenvalue spectra on a log scale, one line per label, effective rank in the legend.

    Parameters
    ----------
    spectra : dict label -> 1-D non-negative array (descending); zeros are not drawn
    path : image file to write (format from the suffix)

    Returns
    -------
    Path
    """
    from matplotlib.figure import Figure
    if not spectra:
        raise MecrefError("spectra must hold at least one {label: spectrum} entry, got {}")
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for label, lam in spectra.items():
        lam = np.asarray(lam, dtype=np.float64)
        k = np.arange(1, lam.size + 1)
        pos = lam > 0
        ax.semilogy(k[pos], lam[pos], marker=".", label=f"{label} (erank {effective_rank(lam):.1f})")
    ax.set_xlabel("eigenvalue index k (descending)")
    ax.set_ylabel("eigenvalue of the feature covariance")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


_PANELS = (("effective_rank", "effective rank"),
           ("coding_length_per_sample", "coding length per sample (nats)"),
           ("between_within", "between / within class spread"))


def plot_diagnostics(table, path):
    """Grouped bars: effective rank, coding length per sample and between/within spread, per
    bit-width (x) and method (colour); FP32 rows as dashed horizontal lines.

    Parameters
    ----------
    table : list of dict with ``bits``, ``method`` and the keys ``effective_rank``,
        ``coding_length_per_sample``, ``between_within`` (the rows of :func:`diagnose`)
    path : image file to write

    Returns
    -------
    Path
    """
    from matplotlib.figure import Figure
    table = list(table)
    if not table:
        raise MecrefError("table must hold at least one row, got []")
    fp = [r for r in table if r["bits"] == "FP32"]
    q = [r for r in table if r["bits"] != "FP32"]
    bits = list(dict.fromkeys(r["bits"] for r in q))
    methods = list(dict.fromkeys(r["method"] for r in q))
    fig = Figure(figsize=(4.4 * len(_PANELS), 3.8), layout="constrained")
    axes = fig.subplots(1, len(_PANELS))
    width = 0.8 / max(len(methods), 1)
    for ax, (key, name) in zip(axes, _PANELS):
        for j, method in enumerate(methods):
            vals = {r["bits"]: _num(r[key]) for r in q if r["method"] == method}
            x = [i + (j - (len(methods) - 1) / 2) * width for i, b in enumerate(bits) if b in vals]
            ax.bar(x, [vals[b] for b in bits if b in vals], width=width, label=method)
        for r in fp:
            if np.isfinite(_num(r[key])):
                ax.axhline(r[key], color="0.3", ls="--", label="FP32")
        ax.set_xticks(range(len(bits)), bits)
        ax.set_xlabel("bit-width (weights/activations)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def markdown_diagnostics(table) -> str:
    """The rows of :func:`diagnose` as a Markdown table."""
    cols = ("bits", "method", "accuracy", "effective_rank", "coding_length_per_sample",
            "between_within", "zero_rows")
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in table:
        cells = ["-" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                 for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(v):
    return float("nan") if v is None else float(v)


# ----------------------------------------------------------------------------------------------
# The whole pipeline: train or load, measure, write
# ----------------------------------------------------------------------------------------------

def diagnose(out_dir, bits=((4, 4), (2, 2)), epochs: int = 6, seed: int = 0, workers: int = 2,
             n_samples: int = 2000, diag_eps: float = 0.5, reg: str = "mec_taylor", settings=None,
             from_sweep=None, progress=True, client=None, **common) -> dict:
    """Train (or find cached) FP32, LSQ and MEC-Quant models and measure their features.

    The models are the cells of :func:`mecref.experiments.run_grid` with the same configurations
    as :func:`mecref.experiments.main_grid` (FP32; LSQ; LSQ + ``reg`` with ``settings``), so
    pointing ``out_dir`` at a main-table folder with the same ``epochs``, ``settings`` and
    ``common`` fields reuses its trained models (their checkpoints) instead of training again.
    ``from_sweep`` (a sweep folder) takes the settings with the best validation accuracy there
    (:func:`mecref.experiments.settings_from_sweep`); explicit ``settings`` entries win.
    ``client`` (a ``distributed.Client``) trains them on a Dask cluster (:mod:`mecref.cluster`).

    On the first ``n_samples`` test images, for each model: accuracy, the covariance spectrum
    of the unit features, effective rank, coding length per sample at ``diag_eps`` (the same m
    and eps for every model) and the class spread. Rows of zeros (dead features) are dropped
    and counted (``zero_rows``).

    Writes ``diagnostics.json`` (``table``, ``spectra``, settings), ``spectra_<bits>.png`` per
    bit-width (FP32 in each) and ``diagnostics.png``.

    Returns
    -------
    dict, the content of ``diagnostics.json``
    """
    from .experiments import _check_bits_list, bits_label, main_grid, method_label, \
        model_from_checkpoint, run_grid, settings_from_sweep
    n_samples = check_int("n_samples", n_samples, 2)
    diag_eps = check_positive("diag_eps", diag_eps)
    from . import regularizers
    check_choice("reg", reg, regularizers.names())
    pairs = _check_bits_list(bits)
    if from_sweep is not None:
        settings = settings_from_sweep(from_sweep, settings)
    grid = main_grid(epochs=epochs, bits=pairs, settings=settings, **common)
    keep = [c for c in grid if c["quantizer"] == "fp32"
            or (c["quantizer"] == "lsq" and c["reg"] in (None, reg))]
    records = run_grid(keep, [seed], out_dir, workers=workers, progress=progress, client=client)
    out = Path(out_dir)
    cfg0 = records[0]["config"]
    ds = mdata.load_dataset(cfg0["dataset"], data_dir=cfg0["data_dir"])
    x, y = ds.x_test[:n_samples], ds.y_test[:n_samples]
    table, spectra = [], {}
    for rec in records:
        if rec["status"] != "ok":
            continue
        model, _ = model_from_checkpoint(out / rec["checkpoint"], backend=cfg0["backend"])
        Z, pred = collect_features(model, x, y)
        nonzero = np.sum(Z * Z, axis=1) > 0
        Zk, yk = Z[nonzero], y[nonzero]
        lam = feature_covariance_spectrum(Zk)
        spread = per_class_spread(Zk, yk)
        row = dict(bits=bits_label(rec["config"]), method=method_label(rec["config"]),
                   key=rec["key"], seed=seed, accuracy=float(np.mean(pred == y)),
                   m=int(Zk.shape[0]), d=int(Zk.shape[1]), zero_rows=int(np.sum(~nonzero)),
                   effective_rank=effective_rank(lam),
                   coding_length_per_sample=coding_length_per_sample(Zk, diag_eps),
                   within=spread["within_mean"], between=spread["between"],
                   between_within=spread["ratio"] if np.isfinite(spread["ratio"]) else None)
        row["name"] = row["bits"] if row["bits"] == row["method"] else f"{row['bits']} {row['method']}"
        table.append(row)
        spectra[row["name"]] = lam.tolist()
    if not table:
        raise MecrefError("diagnose: every model diverged; nothing to measure")
    for b in dict.fromkeys(r["bits"] for r in table if r["bits"] != "FP32"):
        sel = {r["name"]: spectra[r["name"]] for r in table if r["bits"] in ("FP32", b)}
        plot_spectra(sel, out / f"spectra_{b}.png", title=f"Feature covariance spectra, {b}")
    plot_diagnostics(table, out / "diagnostics.png")
    result = dict(table=table, spectra=spectra, n_samples=int(len(x)), diag_eps=diag_eps,
                  seed=seed, dataset=ds.name, settings=settings)
    from .checkpoint import write_atomic
    text = json.dumps(result, indent=1).encode("utf-8")
    write_atomic(out / "diagnostics.json", lambda fh: fh.write(text))
    return result

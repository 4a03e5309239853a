"""Write the snapshot of CuPy's API that the test stand-in (tests/fakecupy) is checked against.

    python3 -m pip install cupy-cuda12x          # imports without a GPU
    python3 scripts/cupy_api_snapshot.py         # writes tests/fakecupy/cupy_api.json

Records, for the real CuPy installed here, every public name of ``cupy``, ``cupy.linalg``,
``cupy.lib.stride_tricks``, ``cupyx`` and ``cupyx.scipy.linalg`` and every public attribute
of ``cupy.ndarray``, each with its parameters where they can be read: ``inspect.signature``
for Python functions, the signature line Cython embeds at the top of a docstring for
compiled ones (``ndarray`` methods, ufuncs), the source for ``cupyx.scipy.linalg`` (whose
import needs CUDA's cuBLAS). The stand-in exposes only names found here and refuses keywords
that CuPy's signature lacks, so a NumPy-only function or keyword on the device path fails in
the tests. The file records CuPy's version and where it came from.
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "fakecupy" / "cupy_api.json"
_KINDS = {"POSITIONAL_ONLY": "pos", "POSITIONAL_OR_KEYWORD": "any", "VAR_POSITIONAL": "*",
          "KEYWORD_ONLY": "kw", "VAR_KEYWORD": "**"}


def _from_signature(sig):
    return [[p.name, _KINDS[p.kind.name]] for p in sig.parameters.values()]


def _from_args(args: ast.arguments, drop_self=False):
    out = [[a.arg, "pos"] for a in args.posonlyargs] + [[a.arg, "any"] for a in args.args]
    if drop_self and out and out[0][0] == "self":
        out = out[1:]
    if args.vararg:
        out.append([args.vararg.arg, "*"])
    out += [[a.arg, "kw"] for a in args.kwonlyargs]
    if args.kwarg:
        out.append([args.kwarg.arg, "**"])
    return out


def _from_docstring(obj):
    """Parameters from the Cython-embedded first docstring line ``name(a, b=1, *, c=2) -> T``."""
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    if not doc:
        return None
    m = re.match(r"^[\w.]*?(\w+)\((.*)\)(\s*->.*)?$", doc[0].replace("\\*", "*"))
    if m is None:
        return None
    try:
        fn = ast.parse(f"def f({m.group(2)}): pass").body[0]
    except SyntaxError:
        return None
    return _from_args(fn.args, drop_self=True)


def _params(obj):
    try:
        return _from_signature(inspect.signature(obj))
    except (TypeError, ValueError):
        return _from_docstring(obj)


def _kind(obj):
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if type(obj).__name__ == "ufunc":
        return "ufunc"
    if callable(obj):
        return "function"
    return "value"


def _entry(obj, same=None):
    """kind, parameters, and whether the object is NumPy's own (dtypes, finfo, constants)."""
    kind = _kind(obj)
    e = {"kind": kind, "params": _params(obj) if kind in ("function", "ufunc") else None}
    if same is not None and obj is same:
        e["numpy"] = True
    return e


def module_names(mod, np_mod=None):
    return {n: _entry(getattr(mod, n), getattr(np_mod, n, None)) for n in sorted(dir(mod))
            if not n.startswith("_") and hasattr(mod, n)}


def source_names(modname):
    """Names and signatures of a package read from its source, without importing it: the
    names its ``__init__`` defines or imports, each function's parameters from its ``def``."""
    spec = importlib.util.find_spec(modname)
    root = Path(spec.origin)
    out = {}
    for node in ast.parse(root.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(modname):
            parts = node.module[len(modname) + 1:].split(".")
            sub = root.parent.joinpath(*parts).with_suffix(".py")
            defs = {d.name: d for d in ast.walk(ast.parse(sub.read_text()))
                    if isinstance(d, ast.FunctionDef)}
            for alias in node.names:
                name = alias.asname or alias.name
                if name.startswith("_"):
                    continue
                d = defs.get(alias.name)
                out[name] = {"kind": "function" if d else "value",
                             "params": _from_args(d.args) if d else None}
        elif isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            out[node.name] = {"kind": "function", "params": _from_args(node.args)}
    return dict(sorted(out.items()))


def main(out=OUT):
    import cupy
    import cupy.lib.stride_tricks
    import cupy.linalg
    import cupyx
    import numpy
    from importlib.metadata import PackageNotFoundError, distribution

    dist = None
    for name in ("cupy-cuda12x", "cupy-cuda13x", "cupy"):
        try:
            dist = distribution(name)
            break
        except PackageNotFoundError:
            continue
    snap = {
        "cupy_version": cupy.__version__,
        "distribution": f"{dist.metadata['Name']} {dist.version}" if dist else None,
        "python": sys.version.split()[0],
        "regenerate": "python3 -m pip install cupy-cuda12x && python3 scripts/cupy_api_snapshot.py",
        "modules": {
            "cupy": module_names(cupy, numpy),
            "cupy.linalg": module_names(cupy.linalg, numpy.linalg),
            "cupy.lib.stride_tricks": module_names(cupy.lib.stride_tricks),
            "cupyx": module_names(cupyx),
            "cupyx.scipy.linalg": source_names("cupyx.scipy.linalg"),
        },
        "ndarray": {n: _entry(getattr(cupy.ndarray, n)) for n in sorted(dir(cupy.ndarray))
                    if not n.startswith("_") or n in ("__array__", "__array_ufunc__",
                                                      "__array_function__", "__float__",
                                                      "__int__", "__bool__", "__index__",
                                                      "__complex__", "__iter__", "__len__")},
    }
    Path(out).write_text(json.dumps(snap, indent=0, sort_keys=True) + "\n")
    counts = {k: len(v) for k, v in snap["modules"].items()}
    print(f"wrote {out}: CuPy {cupy.__version__} ({snap['distribution']}), names {counts}, "
          f"ndarray attributes {len(snap['ndarray'])}")


if __name__ == "__main__":
    main(*sys.argv[1:])

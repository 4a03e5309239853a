"""Data: the bundled Fashion-MNIST subset, an IDX reader, seeded batching, two-view augmentation.

Floor 4: imports only from ``backend`` and ``validate``.

Images are kept as uint8 ``(N, H, W)`` on the host; :func:`normalize` turns them into float32
``(N, 1, H, W)`` on a backend. Every random decision (permutations, shifts, flips) is drawn on
the host from a ``numpy.random.Generator`` and moved to the device as a small array, so one seed
gives the same batches and the same augmented views on NumPy and CuPy. See ``docs/data.md``.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import MecrefError, array_module, backend_name, get_xp, to_backend
from .validate import check_choice, check_int

__all__ = [
    "Dataset", "FASHION_MNIST_CLASSES", "DIGIT_CLASSES", "PIXEL_MEAN", "PIXEL_STD",
    "DEBIAN_FASHION_MNIST_DIR", "BUNDLED_NPZ", "BUNDLED_JSON",
    "read_idx", "load_idx_dir", "load_bundled", "load_dataset", "bundled_provenance",
    "train_val_split", "normalize", "iterate_batches", "shift_flip", "augment", "two_views",
]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(k) for k in range(10))

# Pixel mean and std on the [0, 1] scale (x / 255) over all pixels of the bundled training set
# (12,000 images); printed by scripts/make_bundled_data.py and checked by tests/test_data.py.
# The full 60,000-image Fashion-MNIST training set gives 0.2860 / 0.3530.
PIXEL_MEAN = 0.2870
PIXEL_STD = 0.3536

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
BUNDLED_NPZ = "fashion_mnist_subset.npz"
BUNDLED_JSON = "fashion_mnist_subset.json"

_GET_FASHION_MNIST = (
    "get Fashion-MNIST with `apt install dataset-fashion-mnist` (Debian/Ubuntu: it lands in "
    f"{DEBIAN_FASHION_MNIST_DIR}) or download the four *-ubyte.gz files from "
    "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion) and pass "
    "data_dir=<that folder>; or use name='bundled' for the 12,000/2,000-image subset shipped "
    "with mecref"
)


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    """Images and labels of one dataset, on the host.

    Attributes
    ----------
    x_train : ndarray, uint8, (N_train, H, W)
    y_train : ndarray, int64, (N_train,), values in 0..len(classes)-1
    x_test : ndarray, uint8, (N_test, H, W)
    y_test : ndarray, int64, (N_test,)
    classes : tuple of str, the class names, index = label
    name : str, e.g. ``"fashion-mnist-subset"``
    source : str, where the arrays came from (a file or folder)
    """
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple
    name: str
    source: str

    def __post_init__(self):
        self.classes = tuple(str(c) for c in self.classes)
        if not self.classes:
            raise MecrefError("classes must name at least one class, got ()")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            _check_images(f"x_{split}", x)
            y = _check_labels(f"y_{split}", y, len(x), len(self.classes))
            setattr(self, f"y_{split}", y)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise MecrefError(f"x_train and x_test must have the same image size, got "
                              f"{self.x_train.shape[1:]} and {self.x_test.shape[1:]}")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def __repr__(self):
        return (f"Dataset(name={self.name!r}, train={self.x_train.shape}, "
                f"test={self.x_test.shape}, classes={self.n_classes}, source={self.source!r})")


def _check_images(name, x):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.uint8 or x.ndim != 3 or x.size == 0:
        raise MecrefError(f"{name} must be a non-empty uint8 array (N, H, W), "
                          f"got {x.dtype} {x.shape}")


def _check_labels(name, y, n, n_classes):
    if not isinstance(y, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(y).__name__}")
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise MecrefError(f"{name} must be an integer array of shape ({n},), "
                          f"got {y.dtype} {y.shape}")
    if y.min() < 0 or y.max() >= n_classes:
        raise MecrefError(f"{name} must hold labels in 0..{n_classes - 1}, "
                          f"got values in {y.min()}..{y.max()}")
    return y.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------------------------
# Reading: IDX files, folders of them, the bundled subset
# ----------------------------------------------------------------------------------------------

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data is big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read one IDX file (plain, or gzip-compressed: detected from its first bytes).

    Layout: magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
    data, big-endian, C order. The file must hold exactly that many bytes.

    Returns
    -------
    ndarray of the stored shape, native byte order (uint8 for the MNIST family).

    Raises
    ------
    MecrefError
        missing file, bad magic number or type code, zero dimensions, truncated file, trailing
        bytes, corrupt or truncated gzip stream. The message names the file.
    """
    path = _as_path("path", path)
    if not path.is_file():
        raise MecrefError(f"IDX file {str(path)!r} does not exist or is not a file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise MecrefError(f"IDX file {str(path)!r}: corrupt or truncated gzip data "
                              f"({type(exc).__name__}: {exc})") from None
    if len(raw) < 4:
        raise MecrefError(f"IDX file {str(path)!r} is truncated: {len(raw)} bytes, "
                          "shorter than the 4-byte magic number")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise MecrefError(f"{str(path)!r} is not an IDX file: magic number "
                          f"0x{raw[:4].hex()}, expected 0x0000TTNN with type TT in "
                          f"{{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and NN >= 1 dims")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MecrefError(f"IDX file {str(path)!r} is truncated inside its header "
                          f"({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims, dtype=np.int64))
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise MecrefError(f"IDX file {str(path)!r} is {what}: header gives shape {dims} of "
                          f"{dtype.name}, {expected} bytes in all, the data has {len(raw)}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native order, writable copy


_IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$")


def load_idx_dir(data_dir, name="idx", classes=DIGIT_CLASSES) -> Dataset:
    """Load a folder holding the four MNIST-style IDX files.

    Looks for ``{train,t10k}-images-idx3-ubyte`` and ``{train,t10k}-labels-idx1-ubyte``, each
    plain or ``.gz`` (a ``.`` before ``idx`` is accepted too); where both the plain and the
    ``.gz`` file exist, the plain one is read. Works for full Fashion-MNIST (pass
    ``classes=FASHION_MNIST_CLASSES``), MNIST, and other datasets in the same layout.

    Returns
    -------
    Dataset with uint8 images ``(N, H, W)`` and int64 labels.

    Raises
    ------
    MecrefError
        ``data_dir`` missing, not a folder, empty, or lacking one of the four files; files
        that disagree (image/label counts, image sizes); labels outside ``0..len(classes)-1``.
    """
    data_dir = _as_path("data_dir", data_dir)
    if not data_dir.is_dir():
        raise MecrefError(f"data_dir {str(data_dir)!r} does not exist or is not a folder")
    entries = sorted(p.name for p in data_dir.iterdir())
    if not entries:
        raise MecrefError(f"data_dir {str(data_dir)!r} is empty; expected the four IDX files "
                          "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                          "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]")
    found = {}
    for fname in entries:
        m = _IDX_NAME.match(fname)
        if m is None:
            continue
        key = (m.group(1), m.group(2))
        if key not in found or not m.group(4):  # prefer the uncompressed file
            found[key] = data_dir / fname
    wanted = [(s, k) for s in ("train", "t10k") for k in ("images", "labels")]
    missing = [f"{s}-{k}-idx{3 if k == 'images' else 1}-ubyte[.gz]"
               for s, k in wanted if (s, k) not in found]
    if missing:
        raise MecrefError(f"data_dir {str(data_dir)!r} lacks {', '.join(missing)}; "
                          f"it holds {entries[:10]}{' ...' if len(entries) > 10 else ''}")
    arrays = {}
    for split, kind in wanted:
        path = found[(split, kind)]
        a = read_idx(path)
        ndim = 3 if kind == "images" else 1
        if a.ndim != ndim or a.dtype != np.uint8:
            raise MecrefError(f"{str(path)!r} must hold a uint8 array with {ndim} dims, "
                              f"got {a.dtype} {a.shape}")
        arrays[(split, kind)] = a
    for split in ("train", "t10k"):
        nx, ny = len(arrays[(split, "images")]), len(arrays[(split, "labels")])
        if nx != ny:
            raise MecrefError(f"{split} files in {str(data_dir)!r} disagree: "
                              f"{nx} images, {ny} labels")
    return Dataset(arrays[("train", "images")], arrays[("train", "labels")],
                   arrays[("t10k", "images")], arrays[("t10k", "labels")],
                   classes=tuple(classes), name=str(name), source=str(data_dir))


_DATAFILES = Path(__file__).resolve().parent / "_datafiles"


def _datafile(fname):
    path = _DATAFILES / fname
    if not path.is_file():
        raise MecrefError(f"bundled data file {str(path)!r} is missing: the mecref install is "
                          "incomplete (package data mecref/_datafiles/*); reinstall mecref or "
                          "rebuild it with scripts/make_bundled_data.py")
    return path


def bundled_provenance() -> dict:
    """The provenance record of the bundled subset (source files and sha256, seed, counts)."""
    return json.loads(_datafile(BUNDLED_JSON).read_text(encoding="utf-8"))


def load_bundled() -> Dataset:
    """The Fashion-MNIST subset shipped with mecref: 12,000 train + 2,000 test images.

    Class-balanced (1,200 and 200 per class), drawn with a fixed seed from the official
    Fashion-MNIST splits by ``scripts/make_bundled_data.py``; see ``docs/data.md``.
    """
    with np.load(_datafile(BUNDLED_NPZ)) as z:
        return Dataset(z["x_train"], z["y_train"], z["x_test"], z["y_test"],
                       classes=FASHION_MNIST_CLASSES, name="fashion-mnist-subset",
                       source=f"mecref/_datafiles/{BUNDLED_NPZ}")


def load_dataset(name="bundled", data_dir=None) -> Dataset:
    """Load a dataset by name.

    Parameters
    ----------
    name : {"bundled", "fashion-mnist", "idx"}
        ``"bundled"``: the shipped subset (``data_dir`` must be None). ``"fashion-mnist"``: the
        full 60,000/10,000 set from ``data_dir``, or from ``DEBIAN_FASHION_MNIST_DIR`` when
        ``data_dir`` is None and that folder exists. ``"idx"``: any MNIST-style folder
        ``data_dir`` (e.g. MNIST), classes named "0".."9".
    data_dir : str or path-like, optional
    """
    check_choice("name", name, ("bundled", "fashion-mnist", "idx"))
    if name == "bundled":
        if data_dir is not None:
            raise MecrefError(f"name='bundled' reads the shipped subset and takes no data_dir, "
                              f"got data_dir={data_dir!r}; use name='fashion-mnist' or 'idx'")
        return load_bundled()
    if name == "fashion-mnist":
        if data_dir is None:
            if not os.path.isdir(DEBIAN_FASHION_MNIST_DIR):
                raise MecrefError("name='fashion-mnist' with data_dir=None needs "
                                  f"{DEBIAN_FASHION_MNIST_DIR}, which is missing: "
                                  + _GET_FASHION_MNIST)
            data_dir = DEBIAN_FASHION_MNIST_DIR
        return load_idx_dir(data_dir, name="fashion-mnist", classes=FASHION_MNIST_CLASSES)
    if data_dir is None:
        raise MecrefError("name='idx' needs data_dir, a folder with the four MNIST-style IDX "
                          "files, got None")
    return load_idx_dir(data_dir, name=f"idx:{Path(data_dir).name}", classes=DIGIT_CLASSES)


def _as_path(name, p):
    if not isinstance(p, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or path-like, got {type(p).__name__} {p!r}")
    return Path(p)


# ----------------------------------------------------------------------------------------------
# Validation split
# ----------------------------------------------------------------------------------------------

def train_val_split(ds: Dataset, n_val: int, seed: int):
    """Stratified, seeded split of ``ds``'s training set into train and validation parts.

    Class c (n_c of the N training images) gives round(n_val n_c / N) validation images
    (largest remainders settle the total to exactly ``n_val``), drawn at random with
    ``numpy.random.default_rng(seed)``. Choose hyperparameters on the validation part; the
    test set is for the final report only.

    Returns
    -------
    (x_tr, y_tr), (x_val, y_val)
        uint8 ``(N - n_val, H, W)``, int64 ``(N - n_val,)`` and uint8 ``(n_val, H, W)``,
        int64 ``(n_val,)``; each keeps the original order of ``ds.x_train``.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"ds must be a mecref.data.Dataset, got {type(ds).__name__}")
    y = ds.y_train
    n = len(y)
    n_val = check_int("n_val", n_val, lo=1, hi=n - 1)
    seed = check_int("seed", seed, lo=0)
    counts = np.bincount(y, minlength=ds.n_classes)
    share = n_val * counts / n
    k = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - k), kind="stable")  # largest remainders first
    k[order[: n_val - k.sum()]] += 1
    rng = np.random.default_rng(seed)
    val = np.zeros(n, dtype=bool)
    for c in range(ds.n_classes):
        members = np.flatnonzero(y == c)
        val[rng.choice(members, size=k[c], replace=False)] = True
    return (ds.x_train[~val], y[~val]), (ds.x_train[val], y[val])


# ----------------------------------------------------------------------------------------------
# Normalisation and batching
# ----------------------------------------------------------------------------------------------

def normalize(x, xp=None, mean=PIXEL_MEAN, std=PIXEL_STD):
    """uint8 images to standardised float32 with a channel axis, on the array module ``xp``.

    .. math:: \\hat x = (x / 255 - \\mu) / \\sigma

    with the fixed constants ``mu = PIXEL_MEAN``, ``sigma = PIXEL_STD`` of the bundled
    training set (pass others for another dataset, e.g. MNIST 0.1307 / 0.3081).

    Parameters
    ----------
    x : uint8 array (N, H, W), on either backend
    xp : numpy or cupy module, optional; default: the module that owns ``x``

    Returns
    -------
    float32 array (N, 1, H, W) on ``xp``
    """
    if not hasattr(x, "dtype") or x.dtype != np.uint8 or x.ndim != 3:
        raise MecrefError(f"x must be a uint8 array (N, H, W), got "
                          f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if not (np.isfinite(std) and std > 0 and np.isfinite(mean)):
        raise MecrefError(f"mean must be finite and std finite and > 0, got {mean!r}, {std!r}")
    xp = array_module(x) if xp is None else xp
    x = to_backend(x, backend_name(xp))  # move the uint8 bytes, a quarter of the float32 size
    scale, shift = np.float32(1.0 / (255.0 * std)), np.float32(mean / std)
    out = x.astype(np.float32) * scale - shift
    return out[:, None, :, :]


def iterate_batches(x, y, batch_size, rng, shuffle=True, drop_last=True, backend="numpy"):
    """Seeded mini-batches of normalised images on a backend.

    The images move to the backend once; each epoch's order is ``rng.permutation(N)``, drawn
    on the host (identity order with ``shuffle=False``).

    Parameters
    ----------
    x : uint8 array (N, H, W); y : integer array (N,)
    batch_size : int, 1 <= batch_size <= N
    rng : numpy.random.Generator
    shuffle, drop_last : bool; ``drop_last`` skips the final short batch
    backend : "numpy" or "cupy"

    Yields
    ------
    xb : float32 (B, 1, H, W), :func:`normalize` d;  yb : int64 (B,); both on ``backend``.
    N // batch_size batches with ``drop_last``, ceil(N / batch_size) without.
    """
    if not hasattr(x, "dtype") or x.dtype != np.uint8 or x.ndim != 3 or x.size == 0:
        raise MecrefError(f"x must be a non-empty uint8 array (N, H, W), got "
                          f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    n = x.shape[0]
    if (not hasattr(y, "dtype") or y.shape != (n,)
            or not np.issubdtype(np.dtype(y.dtype), np.integer)):
        raise MecrefError(f"y must be an integer array of shape ({n},), got "
                          f"{getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}")
    batch_size = check_int("batch_size", batch_size, lo=1)
    if batch_size > n:
        raise MecrefError(f"batch_size must be at most the number of samples {n}, "
                          f"got {batch_size}")
    _check_rng(rng)
    xp = get_xp(backend)
    return _batches(to_backend(x, backend), to_backend(y, backend, dtype=np.int64),
                    batch_size, rng, bool(shuffle), bool(drop_last), xp)


def _batches(x, y, batch_size, rng, shuffle, drop_last, xp):
    n = x.shape[0]
    order = rng.permutation(n) if shuffle else np.arange(n)
    order = xp.asarray(order)
    stop = n - batch_size + 1 if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield normalize(x[idx], xp), y[idx]


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")


# ----------------------------------------------------------------------------------------------
# Augmentation: random shift (edge-padded crop) and horizontal flip
# ----------------------------------------------------------------------------------------------

def _check_views_input(x):
    if not hasattr(x, "dtype") or x.ndim not in (3, 4) or x.shape[0] == 0:
        raise MecrefError(f"x must be a non-empty image batch (N, H, W) or (N, C, H, W), got "
                          f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")


def shift_flip(x, dy, dx, flip):
    """Shift each image by its own (dy, dx), then flip it left-right where ``flip`` is set.

    .. math::
        \\text{out}[n, \\ldots, i, j] = x[n, \\ldots, \\mathrm{clip}(i + dy_n, 0, H-1),
                                        \\mathrm{clip}(j'_n + dx_n, 0, W-1)],\\quad
        j'_n = W - 1 - j \\text{ if } \\text{flip}_n \\text{ else } j

    i.e. the crop at offset ``(p + dy, p + dx)`` of the image padded by ``p`` pixels with its
    edge values (``numpy.pad(mode="edge")``), mirrored where ``flip``. Two gathers (columns,
    then rows) with index arrays of N (H + W) integers; any dtype, either backend.

    Parameters
    ----------
    x : array (N, H, W) or (N, C, H, W); all channels of an image move together
    dy, dx : integer host arrays (N,), the crop offsets (content moves by -dy, -dx)
    flip : bool host array (N,)

    Returns
    -------
    array shaped and typed like ``x``, on the backend of ``x``
    """
    _check_views_input(x)
    n, (h, w) = x.shape[0], x.shape[-2:]
    dy = _host_vector("dy", dy, n, np.integer, "an integer")
    dx = _host_vector("dx", dx, n, np.integer, "an integer")
    flip = _host_vector("flip", flip, n, np.bool_, "a bool")
    rows = np.clip(np.arange(h)[None, :] + dy[:, None], 0, h - 1)             # (N, H)
    j = np.where(flip[:, None], np.arange(w)[::-1][None, :], np.arange(w)[None, :])
    cols = np.clip(j + dx[:, None], 0, w - 1)                                 # (N, W)
    c = 1 if x.ndim == 3 else x.shape[1]
    rows, cols = np.repeat(rows, c, axis=0), np.repeat(cols, c, axis=0)  # one per (n, channel)
    xp = array_module(x)
    rows, cols = xp.asarray(rows), xp.asarray(cols)  # small: N C (H + W) integers
    k = xp.arange(n * c)[:, None]
    x3 = x.reshape(n * c, h, w)
    picked = x3.transpose(0, 2, 1)[k, cols]          # (N C, W, H): columns gathered
    out = picked.transpose(0, 2, 1)[k, rows]         # (N C, H, W): rows gathered, C order
    return out.reshape(x.shape)


def _host_vector(name, a, n, kind, what):
    if not isinstance(a, (np.ndarray, list, tuple)):
        raise TypeError(f"{name} must be a host (numpy) array of shape ({n},), "
                        f"got {type(a).__name__}")
    a = np.asarray(a)
    if a.shape != (n,) or not np.issubdtype(a.dtype, kind):
        raise MecrefError(f"{name} must be {what} array of shape ({n},), "
                          f"got {a.dtype} {a.shape}")
    return a


def augment(x, rng, pad=2, hflip=True):
    """One random view: shift by up to ``pad`` pixels each way, flip left-right with p = 1/2.

    Shifts ``dy, dx`` are uniform on ``-pad..pad`` (pad 2: 25 positions, 7% of 28 pixels);
    pixels shifted in repeat the image edge (see :func:`shift_flip`), which is the background
    for centred items and is right for raw uint8 and normalised float images alike. Flips keep
    the class for clothing (a mirrored shirt is a shirt). All draws come from ``rng`` on the
    host, in the order dy, dx, flip, so a seed gives the same view on NumPy and CuPy.

    Parameters
    ----------
    x : array (N, H, W) or (N, C, H, W), either backend
    rng : numpy.random.Generator
    pad : int, 0 <= pad < min(H, W)
    hflip : bool

    Returns
    -------
    array shaped and typed like ``x``, on the backend of ``x``
    """
    _check_views_input(x)
    _check_rng(rng)
    h, w = x.shape[-2:]
    pad = check_int("pad", pad, lo=0, hi=min(h, w) - 1)
    n = x.shape[0]
    dy = rng.integers(-pad, pad + 1, size=n)
    dx = rng.integers(-pad, pad + 1, size=n)
    flip = rng.random(n) < 0.5 if hflip else np.zeros(n, dtype=bool)
    return shift_flip(x, dy, dx, flip)


def two_views(x, rng, pad=2, hflip=True):
    """Two independent views ``(augment(x, rng), augment(x, rng))`` for the two-view MEC term."""
    return augment(x, rng, pad=pad, hflip=hflip), augment(x, rng, pad=pad, hflip=hflip)

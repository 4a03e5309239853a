"""Tests of mecref.data: bundled subset, IDX reading, splits, batching, augmentation.

Oracles: an IDX writer written here from the format description, numpy.pad(mode="edge") +
crop + mirror per image for the augmentation, and counting identities for splits and batches.
"""
import gzip
import hashlib
import os
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

from mecref.backend import MecrefError, get_xp, to_backend, to_host
from mecref import data as D
from mecref.data import (FASHION_MNIST_CLASSES, PIXEL_MEAN, PIXEL_STD, Dataset, augment,
                         iterate_batches, load_bundled, load_dataset, load_idx_dir, normalize,
                         read_idx, shift_flip, train_val_split, two_views)


@pytest.fixture(scope="module")
def bundled():
    return load_bundled()


# ---------------------------------------------------------------------------------------------
# IDX files written from the format description (independent of read_idx)
# ---------------------------------------------------------------------------------------------

CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
         np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(a):
    head = bytes([0, 0, CODES[a.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx(path, a, gz=None):
    raw = idx_bytes(a)
    gz = str(path).endswith(".gz") if gz is None else gz
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def synthetic_dir(tmp_path, n_train=30, n_test=10, h=6, w=5, gz=True, sep="-", seed=0):
    r = np.random.default_rng(seed)
    arrays = {"train": (r.integers(0, 256, (n_train, h, w), dtype=np.uint8),
                        r.integers(0, 10, n_train).astype(np.uint8)),
              "t10k": (r.integers(0, 256, (n_test, h, w), dtype=np.uint8),
                       r.integers(0, 10, n_test).astype(np.uint8))}
    ext = ".gz" if gz else ""
    for split, (x, y) in arrays.items():
        write_idx(tmp_path / f"{split}-images{sep}idx3-ubyte{ext}", x)
        write_idx(tmp_path / f"{split}-labels{sep}idx1-ubyte{ext}", y)
    return arrays


# ---------------------------------------------------------------------------------------------
# The bundled subset
# ---------------------------------------------------------------------------------------------

def test_bundled_counts_dtypes_balance(bundled):
    ds = bundled
    assert ds.x_train.shape == (12000, 28, 28) and ds.x_test.shape == (2000, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.classes == FASHION_MNIST_CLASSES and ds.n_classes == 10
    for y, per in ((ds.y_train, 1200), (ds.y_test, 200)):
        assert y.min() == 0 and y.max() == 9
        assert np.bincount(y, minlength=10).tolist() == [per] * 10


def test_bundled_matches_its_provenance(bundled):
    prov = D.bundled_provenance()
    assert prov["counts"] == {"train": 12000, "test": 2000}
    assert prov["counts_per_class"]["train"] == [1200] * 10
    assert prov["classes"] == list(FASHION_MNIST_CLASSES)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        a = getattr(bundled, name).astype(np.uint8)  # stored as uint8
        assert hashlib.sha256(a.tobytes()).hexdigest() == prov["array_sha256"][name], name
    licence = (D._DATAFILES / "FASHION_MNIST_LICENSE.txt").read_text()
    assert "Zalando SE" in licence and "Permission is hereby granted" in licence


@pytest.mark.skipif(not os.path.isdir(D.DEBIAN_FASHION_MNIST_DIR),
                    reason="full Fashion-MNIST (Debian dataset-fashion-mnist) not installed")
def test_bundled_rows_are_the_source_rows(bundled):
    src = D.DEBIAN_FASHION_MNIST_DIR
    with np.load(D._DATAFILES / D.BUNDLED_NPZ) as z:
        i_train, i_test = z["train_index"], z["test_index"]
    assert len(np.unique(i_train)) == 12000 and len(np.unique(i_test)) == 2000
    y_src = read_idx(os.path.join(src, "t10k-labels-idx1-ubyte.gz"))
    x_src = read_idx(os.path.join(src, "t10k-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(bundled.x_test, x_src[i_test])
    np.testing.assert_array_equal(bundled.y_test, y_src[i_test])
    y_src = read_idx(os.path.join(src, "train-labels-idx1-ubyte.gz"))
    np.testing.assert_array_equal(bundled.y_train, y_src[i_train])


def test_pixel_constants_are_the_bundled_train_statistics(bundled):
    px = bundled.x_train.astype(np.float64) / 255.0
    assert abs(px.mean() - PIXEL_MEAN) < 5e-5
    assert abs(px.std() - PIXEL_STD) < 5e-5


# ---------------------------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype,shape", [(np.uint8, (7, 4, 3)), (np.uint8, (9,)),
                                         (np.int8, (2, 3)), (np.int16, (5, 2)),
                                         (np.int32, (3, 1, 2, 2)), (np.float32, (4,)),
                                         (np.float64, (2, 2))])
def test_read_idx_round_trip(tmp_path, gz, dtype, shape):
    r = np.random.default_rng(1)
    a = (r.standard_normal(shape) * 100).astype(dtype)
    path = write_idx(tmp_path / "a.idx", a, gz=gz)  # gzip found from the bytes, not the name
    b = read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative and b.shape == shape
    np.testing.assert_array_equal(a, b)
    b[...] = 0  # a writable copy


def test_read_idx_accepts_str_path_and_empty_dims(tmp_path):
    a = np.zeros((0, 3), np.uint8)
    assert read_idx(str(write_idx(tmp_path / "e.idx", a))).shape == (0, 3)


def _corrupt_cases():
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    gz = gzip.compress(good)
    bad_crc = bytearray(gz)
    bad_crc[-8] ^= 0xFF  # CRC32 of the gzip trailer
    bad_deflate = bytearray(gz)
    bad_deflate[12:20] = b"\xff" * 8
    return {
        "magic": (b"\x01\x00" + good[2:], "not an IDX file"),
        "type code": (good[:2] + b"\x07" + good[3:], "not an IDX file"),
        "zero dims": (b"\x00\x00\x08\x00", "not an IDX file"),
        "tiny": (b"\x00\x00", "truncated"),
        "empty": (b"", "truncated"),
        "header": (good[:10], "truncated inside its header"),
        "data": (good[:-1], "truncated"),
        "trailing": (good + b"\x00", "longer than its header says"),
        "gzip cut": (gz[: len(gz) // 2], "gzip"),
        "gzip crc": (bytes(bad_crc), "gzip"),
        "gzip deflate": (bytes(bad_deflate), "gzip"),
        "gzip of truncated idx": (gzip.compress(good[:-3]), "truncated"),
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_read_idx_rejects_corrupt_files(tmp_path, case):
    raw, msg = _corrupt_cases()[case]
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(raw)
    with pytest.raises(MecrefError, match=msg) as info:
        read_idx(path)
    assert "bad-idx3-ubyte.gz" in str(info.value)


def test_read_idx_argument_errors(tmp_path):
    with pytest.raises(MecrefError, match="does not exist"):
        read_idx(tmp_path / "nope")
    with pytest.raises(MecrefError, match="does not exist"):
        read_idx(tmp_path)
    with pytest.raises(TypeError, match="path must be a str or path-like"):
        read_idx(3)


# ---------------------------------------------------------------------------------------------
# load_idx_dir, load_dataset, Dataset
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz,sep", [(True, "-"), (False, "-"), (False, ".")])
def test_load_idx_dir(tmp_path, gz, sep):
    arrays = synthetic_dir(tmp_path, gz=gz, sep=sep)
    (tmp_path / "README").write_text("other files are ignored")
    ds = load_idx_dir(tmp_path)
    np.testing.assert_array_equal(ds.x_train, arrays["train"][0])
    np.testing.assert_array_equal(ds.y_train, arrays["train"][1])
    np.testing.assert_array_equal(ds.x_test, arrays["t10k"][0])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k"][1])
    assert ds.y_train.dtype == np.int64 and ds.x_train.dtype == np.uint8
    assert ds.classes == D.DIGIT_CLASSES and ds.source == str(tmp_path)


def test_load_idx_dir_prefers_the_plain_file(tmp_path):
    arrays = synthetic_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((30, 6, 5), np.uint8))
    np.testing.assert_array_equal(load_idx_dir(tmp_path).x_train, arrays["train"][0])


def test_load_dataset_names(tmp_path, bundled, monkeypatch):
    arrays = synthetic_dir(tmp_path)
    ds = load_dataset("idx", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.x_test, arrays["t10k"][0])
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert ds.classes == FASHION_MNIST_CLASSES and ds.name == "fashion-mnist"
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path))  # the fallback folder
    assert load_dataset("fashion-mnist").x_train.shape == (30, 6, 5)
    assert load_dataset().x_train.shape == bundled.x_train.shape


def test_load_dataset_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(MecrefError, match="apt install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist")
    assert "zalandoresearch/fashion-mnist" in str(info.value) and "data_dir" in str(info.value)
    with pytest.raises(MecrefError, match="name must be one of"):
        load_dataset("cifar10")
    with pytest.raises(MecrefError, match="needs data_dir"):
        load_dataset("idx")
    with pytest.raises(MecrefError, match="takes no data_dir"):
        load_dataset("bundled", data_dir=tmp_path)


def test_load_idx_dir_errors(tmp_path):
    with pytest.raises(MecrefError, match="is empty"):
        load_idx_dir(tmp_path)
    with pytest.raises(MecrefError, match="does not exist or is not a folder"):
        load_idx_dir(tmp_path / "absent")
    with pytest.raises(MecrefError, match="does not exist or is not a folder"):
        load_dataset("idx", data_dir=tmp_path / "absent")
    with pytest.raises(TypeError, match="data_dir"):
        load_idx_dir(None)
    synthetic_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MecrefError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]"):
        load_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(MecrefError, match="10 images, 11 labels"):
        load_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, np.uint8))
    with pytest.raises(MecrefError, match=r"labels in 0\.\.9"):
        load_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((10, 1), np.uint8))
    with pytest.raises(MecrefError, match="uint8 array with 1 dims"):
        load_idx_dir(tmp_path)


def test_dataset_validates():
    x, y = np.zeros((4, 3, 3), np.uint8), np.arange(4)
    ok = Dataset(x, y, x, y, classes=["a", "b", "c", "d"], name="t", source="here")
    assert ok.classes == ("a", "b", "c", "d")
    with pytest.raises(MecrefError, match=r"x_train must be a non-empty uint8 array \(N, H, W\)"):
        Dataset(x.astype(np.float32), y, x, y, classes="abcd", name="t", source="")
    with pytest.raises(MecrefError, match=r"y_test must be an integer array of shape \(4,\)"):
        Dataset(x, y, x, y[:3], classes="abcd", name="t", source="")
    with pytest.raises(MecrefError, match="same image size"):
        Dataset(x, y, np.zeros((4, 2, 3), np.uint8), y, classes="abcd", name="t", source="")
    with pytest.raises(MecrefError, match=r"labels in 0\.\.2"):
        Dataset(x, y, x, y, classes="abc", name="t", source="")


# ---------------------------------------------------------------------------------------------
# train_val_split
# ---------------------------------------------------------------------------------------------

def indexed_dataset(y):
    """Images whose first two pixels spell their row number, so rows can be traced."""
    n = len(y)
    x = np.zeros((n, 4, 4), np.uint8)
    x[:, 0, 0], x[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    k = int(np.max(y)) + 1
    return Dataset(x, np.asarray(y), x[:1], np.asarray(y[:1]), classes=[str(c) for c in range(k)],
                   name="indexed", source="test")


def row_ids(x):
    return x[:, 0, 0].astype(np.int64) + 256 * x[:, 0, 1].astype(np.int64)


def test_train_val_split_bundled_is_stratified_and_disjoint(bundled):
    (x_tr, y_tr), (x_va, y_va) = train_val_split(bundled, 2000, seed=3)
    assert x_tr.shape == (10000, 28, 28) and x_va.shape == (2000, 28, 28)
    assert np.bincount(y_va, minlength=10).tolist() == [200] * 10
    assert np.bincount(y_tr, minlength=10).tolist() == [1000] * 10


@given(counts=st.lists(st.integers(1, 40), min_size=2, max_size=6), frac=st.floats(0.01, 0.99),
       seed=st.integers(0, 2**31))
def test_train_val_split_properties(counts, frac, seed):
    y = np.repeat(np.arange(len(counts)), counts)
    y = np.random.default_rng(seed).permutation(y)
    n = len(y)
    n_val = min(max(1, round(frac * n)), n - 1)
    ds = indexed_dataset(y)
    (x_tr, y_tr), (x_va, y_va) = train_val_split(ds, n_val, seed)
    ids_tr, ids_va = row_ids(x_tr), row_ids(x_va)
    assert len(ids_va) == n_val and len(ids_tr) == n - n_val
    assert set(ids_tr).isdisjoint(ids_va) and set(ids_tr) | set(ids_va) == set(range(n))
    np.testing.assert_array_equal(y_tr, y[ids_tr])
    np.testing.assert_array_equal(y_va, y[ids_va])
    assert np.all(np.diff(ids_tr) > 0) and np.all(np.diff(ids_va) > 0)  # original order kept
    share = n_val * np.asarray(counts) / n
    got = np.bincount(y_va, minlength=len(counts))
    assert np.all((got == np.floor(share)) | (got == np.ceil(share)))
    (_, _), (x_va2, _) = train_val_split(ds, n_val, seed)
    np.testing.assert_array_equal(x_va, x_va2)


def test_train_val_split_seeds_and_errors(bundled):
    ds = indexed_dataset(np.arange(200) % 4)
    v = [row_ids(train_val_split(ds, 40, s)[1][0]) for s in (0, 0, 1)]
    np.testing.assert_array_equal(v[0], v[1])
    assert not np.array_equal(v[0], v[2])
    for bad in (0, 200, -1):
        with pytest.raises(MecrefError, match="n_val must be an integer in"):
            train_val_split(ds, bad, 0)
    with pytest.raises(TypeError, match="n_val"):
        train_val_split(ds, 0.1, 0)
    with pytest.raises(MecrefError, match="seed"):
        train_val_split(ds, 10, -1)
    with pytest.raises(TypeError, match="ds must be a mecref.data.Dataset"):
        train_val_split(bundled.x_train, 10, 0)


# ---------------------------------------------------------------------------------------------
# normalize, iterate_batches
# ---------------------------------------------------------------------------------------------

def test_normalize_values_and_statistics(bundled):
    x = bundled.x_train[:64]
    z = normalize(x, np)
    assert z.shape == (64, 1, 28, 28) and z.dtype == np.float32
    ref = (x.astype(np.float64) / 255.0 - PIXEL_MEAN) / PIXEL_STD
    np.testing.assert_allclose(z[:, 0], ref, rtol=0, atol=2e-6)
    z = normalize(bundled.x_train)
    assert abs(float(z.mean(dtype=np.float64))) < 1e-3
    assert abs(float(z.std(dtype=np.float64)) - 1) < 1e-3
    z = normalize(x, mean=0.5, std=0.25)
    np.testing.assert_allclose(z[:, 0], (x / 255.0 - 0.5) / 0.25, atol=2e-6)


def test_normalize_errors():
    with pytest.raises(MecrefError, match=r"x must be a uint8 array \(N, H, W\)"):
        normalize(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(MecrefError, match=r"x must be a uint8 array \(N, H, W\)"):
        normalize(np.zeros((2, 1, 3, 3), np.uint8))
    with pytest.raises(MecrefError, match="std"):
        normalize(np.zeros((2, 3, 3), np.uint8), std=0.0)


def labelled(n=50, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return x, np.arange(n, dtype=np.int64)  # the label is the row number


@pytest.mark.parametrize("drop_last,expect", [(True, [16, 16, 16]), (False, [16, 16, 16, 2])])
def test_iterate_batches_covers_the_data(drop_last, expect):
    x, y = labelled()
    batches = list(iterate_batches(x, y, 16, np.random.default_rng(0), drop_last=drop_last))
    assert [len(yb) for _, yb in batches] == expect
    seen = np.concatenate([yb for _, yb in batches])
    assert len(set(seen)) == len(seen)
    if not drop_last:
        assert sorted(seen) == list(range(50))
    assert not np.array_equal(seen, np.arange(len(seen)))  # shuffled
    for xb, yb in batches:
        assert xb.dtype == np.float32 and xb.shape == (len(yb), 1, 28, 28)
        assert yb.dtype == np.int64
        np.testing.assert_array_equal(xb, normalize(x[yb]))


def test_iterate_batches_seeded_and_unshuffled():
    x, y = labelled()
    run = lambda s, **kw: [b for _, b in iterate_batches(x, y, 10, np.random.default_rng(s), **kw)]
    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    np.testing.assert_array_equal(np.concatenate(run(7, shuffle=False)), y)


def test_iterate_batches_errors():
    x, y = labelled(20)
    g = np.random.default_rng(0)
    with pytest.raises(MecrefError, match="batch_size must be at most the number of samples 20, "
                                          "got 21"):
        iterate_batches(x, y, 21, g)
    with pytest.raises(MecrefError, match="batch_size"):
        iterate_batches(x, y, 0, g)
    with pytest.raises(TypeError, match="batch_size"):
        iterate_batches(x, y, 2.0, g)
    with pytest.raises(MecrefError, match=r"x must be a non-empty uint8 array"):
        iterate_batches(x.astype(np.float32), y, 4, g)
    with pytest.raises(MecrefError, match=r"y must be an integer array of shape \(20,\)"):
        iterate_batches(x, y[:5], 4, g)
    with pytest.raises(MecrefError, match=r"y must be an integer array"):
        iterate_batches(x, y.astype(np.float32), 4, g)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        iterate_batches(x, y, 4, 0)
    with pytest.raises(MecrefError, match="backend must be one of"):
        iterate_batches(x, y, 4, g, backend="torch")


# ---------------------------------------------------------------------------------------------
# shift_flip, augment, two_views
# ---------------------------------------------------------------------------------------------

def pad_crop_flip(x, dy, dx, flip):
    """The reference: per image, edge-pad, crop at the offset, mirror; a plain Python loop."""
    p = int(max(np.abs(dy).max(), np.abs(dx).max(), 0))
    h, w = x.shape[-2:]
    out = np.empty_like(x)
    for n in range(x.shape[0]):
        width = [(0, 0)] * (x.ndim - 3) + [(p, p), (p, p)]
        padded = np.pad(x[n], width, mode="edge")
        crop = padded[..., p + dy[n]: p + dy[n] + h, p + dx[n]: p + dx[n] + w]
        out[n] = crop[..., ::-1] if flip[n] else crop
    return out


@given(n=st.integers(1, 5), c=st.sampled_from([None, 1, 3]), h=st.integers(1, 9),
       w=st.integers(1, 9), dtype=st.sampled_from([np.uint8, np.float32, np.float64]),
       seed=st.integers(0, 2**31))
def test_shift_flip_matches_pad_crop_flip(n, c, h, w, dtype, seed):
    r = np.random.default_rng(seed)
    shape = (n, h, w) if c is None else (n, c, h, w)
    x = (r.random(shape) * 255).astype(dtype)
    s = max(h, w)
    dy, dx = r.integers(-s, s + 1, n), r.integers(-s, s + 1, n)
    flip = r.random(n) < 0.5
    out = shift_flip(x, dy, dx, flip)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, pad_crop_flip(x, dy, dx, flip))


def framed(n, border, seed=0, h=28, w=28, dtype=np.uint8):
    """Images with content inside and a zero frame ``border`` pixels wide."""
    x = np.zeros((n, h, w), dtype)
    x[:, border:h - border, border:w - border] = np.random.default_rng(seed).integers(
        1, 256, (n, h - 2 * border, w - 2 * border))
    return x


@pytest.mark.parametrize("pad", [2, 3])
def test_augment_keeps_pixel_sum_when_nothing_is_clipped(pad):
    x = framed(64, pad, seed=pad)
    out = augment(x, np.random.default_rng(0), pad=pad)
    np.testing.assert_array_equal(out.sum(axis=(1, 2), dtype=np.int64),
                                  x.sum(axis=(1, 2), dtype=np.int64))
    assert not np.array_equal(out, x)


def test_shift_inverse_and_flip_twice_are_identity():
    r = np.random.default_rng(4)
    x = framed(32, 3, dtype=np.float32)  # a shift of 2 leaves a zero edge to repeat
    dy, dx = r.integers(-2, 3, 32), r.integers(-2, 3, 32)
    none, every = np.zeros(32, bool), np.ones(32, bool)
    np.testing.assert_array_equal(shift_flip(shift_flip(x, dy, dx, none), -dy, -dx, none), x)
    y = r.standard_normal((32, 2, 28, 28)).astype(np.float32)  # any content
    zero = np.zeros(32, np.int64)
    once = shift_flip(y, zero, zero, every)
    np.testing.assert_array_equal(once, y[..., ::-1])
    np.testing.assert_array_equal(shift_flip(once, zero, zero, every), y)


def test_augment_determinism_and_identity(bundled):
    x = normalize(bundled.x_train[:128])
    a1, a2 = two_views(x, np.random.default_rng(5))
    b1, b2 = two_views(x, np.random.default_rng(5))
    c1, _ = two_views(x, np.random.default_rng(6))
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, c1) and not np.array_equal(a1, a2)
    assert a1.shape == x.shape and a1.dtype == np.float32 and a1.flags.c_contiguous
    np.testing.assert_array_equal(augment(x, np.random.default_rng(0), pad=0, hflip=False), x)


def test_augment_draw_order_is_documented():
    """augment = shift_flip with dy, dx, flip drawn in that order from rng."""
    x = np.random.default_rng(1).random((40, 1, 28, 28)).astype(np.float32)
    g = np.random.default_rng(9)
    dy, dx, flip = g.integers(-3, 4, 40), g.integers(-3, 4, 40), g.random(40) < 0.5
    out = augment(x, np.random.default_rng(9), pad=3)
    np.testing.assert_array_equal(out, pad_crop_flip(x, dy, dx, flip))
    assert 0 < flip.sum() < 40


def test_augment_errors():
    x = np.zeros((4, 28, 28), np.float32)
    g = np.random.default_rng(0)
    with pytest.raises(MecrefError, match=r"pad must be an integer in \[0, 27\]"):
        augment(x, g, pad=28)
    with pytest.raises(MecrefError, match="pad"):
        augment(x, g, pad=-1)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        two_views(x, 3)
    with pytest.raises(MecrefError, match=r"x must be a non-empty image batch"):
        augment(np.zeros((28, 28), np.float32), g)
    with pytest.raises(MecrefError, match=r"x must be a non-empty image batch"):
        augment(np.zeros((0, 28, 28), np.float32), g)
    z, f = np.zeros(4, np.int64), np.zeros(4, bool)
    with pytest.raises(MecrefError, match=r"dy must be an integer array of shape \(4,\)"):
        shift_flip(x, z[:3], z, f)
    with pytest.raises(MecrefError, match="dx must be an integer array"):
        shift_flip(x, z, z.astype(np.float64), f)
    with pytest.raises(MecrefError, match="flip must be a bool array"):
        shift_flip(x, z, z, z)
    with pytest.raises(TypeError, match="flip must be a host"):
        shift_flip(x, z, z, None)


# ---------------------------------------------------------------------------------------------
# Backends: the same seed gives the same batches and views on NumPy and CuPy
# ---------------------------------------------------------------------------------------------

def test_backend_batches_and_views(backend):
    x, y = labelled(40)
    xp = get_xp(backend)
    got = list(iterate_batches(x, y, 16, np.random.default_rng(2), backend=backend))
    ref = list(iterate_batches(x, y, 16, np.random.default_rng(2), backend="numpy"))
    for (xb, yb), (xr, yr) in zip(got, ref):
        assert type(xb) is xp.ndarray and type(yb) is xp.ndarray
        assert xb.dtype == np.float32 and yb.dtype == np.int64
        np.testing.assert_array_equal(to_host(yb), yr)
        np.testing.assert_allclose(to_host(xb), xr, rtol=0, atol=1e-6)
    xb = got[0][0]
    v1, v2 = two_views(xb, np.random.default_rng(3))
    assert type(v1) is xp.ndarray and v1.shape == xb.shape
    g = np.random.default_rng(3)
    host = to_host(xb)
    for v in (v1, v2):
        dy, dx, flip = g.integers(-2, 3, 16), g.integers(-2, 3, 16), g.random(16) < 0.5
        np.testing.assert_array_equal(to_host(v), pad_crop_flip(host, dy, dx, flip))
    z = normalize(to_backend(x, backend))
    assert type(z) is xp.ndarray
    np.testing.assert_allclose(to_host(z), normalize(x), rtol=0, atol=1e-6)
    assert type(normalize(x, xp)) is xp.ndarray

import numpy as np
import pytest

from mecref.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _state():
    rng = np.random.default_rng(0)
    return {"conv1.W": rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "bn.n": np.array(3)}


def test_round_trip_is_exact_and_leaves_no_temp_files(tmp_path):
    st, opt = _state(), {"conv1.W": np.ones((4, 1, 3, 3), np.float32)}
    meta = {"config": {"seed": 1}, "model_config": {"width": [4]}, "epoch": 2, "history": [{"a": 1.5}]}
    p = save_checkpoint(tmp_path / "run" / "last.npz", st, opt, meta)
    m2, o2, meta2 = load_checkpoint(p, expect_config=meta, keys=("config", "model_config"))
    assert set(m2) == set(st) and all(np.array_equal(m2[k], st[k]) for k in st)
    assert np.array_equal(o2["conv1.W"], opt["conv1.W"])
    assert meta2["epoch"] == 2 and meta2["history"] == [{"a": 1.5}]
    assert sorted(q.name for q in p.parent.iterdir()) == ["last.json", "last.npz"]


def test_truncated_and_garbage_files_are_refused(tmp_path):
    p = save_checkpoint(tmp_path / "c.npz", _state(), None, {"model_config": {}})
    raw = p.read_bytes()
    for bad in (raw[: len(raw) // 2], b"", b"not a zip at all" * 10):
        q = tmp_path / "bad.npz"
        q.write_bytes(bad)
        with pytest.raises(CheckpointError, match="truncated or corrupt|no metadata"):
            load_checkpoint(q)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")
    q = tmp_path / "plain.npz"
    np.savez(q, a=np.zeros(2))
    with pytest.raises(CheckpointError, match="no metadata"):
        load_checkpoint(q)


def test_other_config_is_refused(tmp_path):
    p = save_checkpoint(tmp_path / "c.npz", _state(), None, {"model_config": {"w_bits": 2}})
    with pytest.raises(CheckpointError, match=r"another configuration \(model_config"):
        load_checkpoint(p, expect_config={"model_config": {"w_bits": 4}})


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    p = save_checkpoint(tmp_path / "c.npz", _state(), None, {"epoch": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        save_checkpoint(p, _state(), None, {"epoch": Unserialisable()})
    _, _, meta = load_checkpoint(p)
    assert meta["epoch"] == 1
    assert sorted(q.name for q in tmp_path.iterdir()) == ["c.json", "c.npz"]

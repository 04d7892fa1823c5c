"""Model files: untrusted input is checked from the archive's headers, saving behaves like np.save."""

import io
import os
import pickle
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

import fastbp as fb
from conftest import make_data

MEMBERS = ("format_version", "sizes", "activation", "output", "loss", "dtype", "params")


def _fields(net):
    """The arrays of ``net``'s model file, to tamper with."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.npz")
        net.save(path)
        with np.load(path) as data:
            return {key: data[key] for key in data.files}


def _npz(path, **fields):
    np.savez(path, **fields)
    return path


def _npy_bytes(shape, dtype, data: bytes) -> bytes:
    """A .npy member whose header says ``shape`` and ``dtype``, followed by ``data`` as it is."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": shape})
    return out.getvalue() + data


@pytest.fixture
def net(backend):
    net = fb.MLP([4, 5, 3], activation="tanh", loss="cross_entropy", seed=0)
    X, Y = make_data(12, 4, 3, "cross_entropy", labels=True)
    net.fit(X, Y, epochs=2, batch_size=4, optimizer="adam", progress=False)
    return net


def _same_model(a, b):
    for x, y in zip(sum(a.get_params(), []), sum(b.get_params(), [])):
        np.testing.assert_array_equal(x, y)
    assert (a.sizes, a.activation, a.loss_name, a.output, a.dtype) == (b.sizes, b.activation, b.loss_name,
                                                                      b.output, b.dtype)


# ---------------------------------------------------------------- file objects
def test_save_and_load_file_objects(net):
    buf = io.BytesIO()
    net.save(buf)
    buf.seek(0)
    back = fb.MLP.load(buf)
    _same_model(net, back)
    assert back.backend is fb.get_backend()
    assert type(back.optimizer) is type(net.optimizer) and back.optimizer.steps == net.optimizer.steps
    np.testing.assert_array_equal(fb.to_numpy(back.optimizer.state.buffers), fb.to_numpy(net.optimizer.state.buffers))


def test_file_object_errors(net, tmp_path):
    with pytest.raises(TypeError, match="binary file object"):
        net.save(io.StringIO())

    class Stream(io.RawIOBase):  # readable, not seekable
        def readable(self):
            return True

        def seekable(self):
            return False

    with pytest.raises(TypeError, match="must be seekable"):
        fb.MLP.load(Stream())
    with pytest.raises(TypeError, match=r"path must be a str, an os.PathLike or a binary file object. Received: 3"):
        net.save(3)


# ---------------------------------------------------------------- not model files
@pytest.mark.parametrize("content,what", [
    (b"", "an empty file"),
    (pickle.dumps({"a": 1}), "a Python pickle"),
    (b"\x89HDF\r\n\x1a\n" + bytes(100), "an HDF5 file"),
    (b'{"sizes": [2, 1]}', "a JSON or text file"),
    (b"garbage" * 30, r"not a \.npz \(zip\) archive"),
])
def test_other_formats_are_refused_clearly(tmp_path, content, what):
    path = tmp_path / "model.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{str(path)!r} is not a fastbp model file: it is {what}") as info:
        fb.MLP.load(path)
    assert "pickle" not in str(info.value).replace("a Python pickle", "")  # no allow_pickle advice


def test_npy_is_refused_clearly(tmp_path):
    """A .npy used to give a TypeError about context managers."""
    np.save(tmp_path / "weights.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"is not a fastbp model file: it is a \.npy file .*MLP\.save writes"):
        fb.MLP.load(tmp_path / "weights.npy")


def test_damaged_archive(net, tmp_path):
    path = tmp_path / "model.npz"
    net.save(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 40] = bytes(40)  # inside params: the CRC no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{str(path)!r} is (corrupt|not a readable fastbp model)"):
        fb.MLP.load(path)
    path.write_bytes(bytes(raw[:100]))  # truncated
    with pytest.raises(ValueError, match=rf"{str(path)!r}"):
        fb.MLP.load(path)


def test_object_members_are_refused_without_pickle_advice(net, tmp_path):
    fields = _fields(net)
    fields["activation"] = np.array([{"evil": 1}], dtype=object)
    path = tmp_path / "obj.npz"
    np.savez(path, **fields)
    with pytest.raises(ValueError, match="holds Python objects") as info:
        fb.MLP.load(path)
    assert "allow_pickle" not in str(info.value)


def test_missing_members(net, tmp_path):
    fields = _fields(net)
    del fields["params"]
    with pytest.raises(ValueError, match=r"is not a fastbp model: missing \['params'\]"):
        fb.MLP.load(_npz(tmp_path / "m.npz", **fields))


# ---------------------------------------------------------------- sizes from the headers first
def test_huge_sizes_in_a_tiny_file_are_refused_before_anything_is_allocated(backend, tmp_path):
    """A ~700-byte file claiming sizes [20000, 20000] used to build a 400M-parameter model first."""
    path = _npz(tmp_path / "big.npz", format_version=np.int64(2), sizes=np.array([40000, 40000]),
                activation=np.str_("relu"), output=np.str_("identity"), loss=np.str_("mse"),
                dtype=np.str_("float32"), params=np.zeros(4))
    assert path.stat().st_size < 2000
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=r"params has shape \(4,\), but sizes \[40000, 40000\] need "
                                             r"\(1600040000,\)"):
            fb.MLP.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0 and peak < 4 << 20


def test_a_header_claiming_more_than_the_member_holds_is_refused(tmp_path, backend):
    """params' .npy header says 10^9 floats over 32 bytes of data: refused from the header, no 8 GB array."""
    path = tmp_path / "lying.npz"
    net = fb.MLP([3, 2], seed=0)
    with zipfile.ZipFile(path, "w") as zf:
        for key, value in _fields(net).items():
            if key != "params":
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asanyarray(value))
                zf.writestr(key + ".npy", buf.getvalue())
        zf.writestr("params.npy", _npy_bytes((10**9,), np.float64, bytes(32)))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"params member declares shape \(1000000000,\) of float64 "
                                             r"\(8000000000 bytes\) but holds 32"):
            fb.MLP.load(path)
        assert tracemalloc.get_traced_memory()[1] < 4 << 20
    finally:
        tracemalloc.stop()


def test_unknown_members_are_not_read(net, tmp_path):
    """A member the format does not have is never decompressed (a 2 GiB zero one took 38 s)."""
    path = tmp_path / "extra.npz"
    np.savez_compressed(path, **_fields(net), padding=np.zeros(8 << 20))  # 64 MB of zeros, ~64 kB on disk
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        back = fb.MLP.load(path)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
    _same_model(net, back)


@pytest.mark.parametrize("key,value,match", [
    ("sizes", np.array([4.7, 3.0]), r"unreadable architecture: sizes holds floats"),
    ("sizes", np.array(["4", "3"]), r"unreadable architecture: sizes holds text"),
    ("sizes", np.array([[4, 5, 3]]), r"sizes holds integers of shape \(1, 3\)"),
    ("sizes", np.array([4, 0, 3]), r"sizes\[1\] out of range"),
    ("sizes", np.array([4]), "sizes has 1 entries"),
    ("format_version", np.int64(-7), r"format version -7; this fastbp reads versions 1 to"),
    ("format_version", np.float64(1.9), "format_version holds floats"),
    ("format_version", np.int64(99), "format version 99 .written by a newer fastbp: upgrade fastbp"),
    ("activation", np.str_("swish"), r"corrupt: unknown activation. Received: activation='swish'"),
    ("dtype", np.str_("float16"), r"corrupt: unsupported dtype"),
    ("loss", np.int64(3), "unreadable architecture: loss holds integers"),
    ("params", np.zeros((2, 38)), r"params holds floats of shape \(2, 38\)"),
    ("params", np.zeros(76, dtype=np.int64), "params holds integers"),
    ("optimizer_state", np.zeros((3, 38)), r"optimizer_state has shape \(3, 38\)"),
    ("optimizer_step", np.int64(-1), "step -1"),
    ("optimizer", np.str_('{"kind": "rmsprop", "config": {}}'), "unreadable optimizer fields"),
    ("optimizer", np.str_("[" * 100000), "optimizer is 100000 characters long"),
])
def test_bad_fields_are_a_value_error_naming_the_file(net, tmp_path, key, value, match):
    fields = _fields(net)
    fields[key] = value
    path = _npz(tmp_path / "bad.npz", **fields)
    with pytest.raises(ValueError, match=match) as info:
        fb.MLP.load(path)
    assert str(path) in str(info.value)


def test_parameters_are_checked_after_the_cast_to_the_model_dtype(backend, tmp_path):
    """Finite float64 values beyond float32 used to load as Inf."""
    net = fb.MLP([3, 2], seed=0)
    fields = _fields(net)
    fields["params"] = fields["params"].astype(np.float64)
    fields["params"][1] = 1e39
    with pytest.raises(ValueError, match=r"params are not all finite in float32: 1 of 8 are NaN, Inf or beyond"):
        fb.MLP.load(_npz(tmp_path / "big.npz", **fields))
    fields["dtype"] = np.str_("float64")
    assert fb.MLP.load(_npz(tmp_path / "ok.npz", **fields)).get_params()[0][0][0, 1] == 1e39


def test_optimizer_state_is_checked_after_the_cast(net, tmp_path):
    fields = _fields(net)
    fields["optimizer_state"] = fields["optimizer_state"].astype(np.float64)
    fields["optimizer_state"][1, 0] = -1e300
    with pytest.raises(ValueError, match="optimizer_state are not all finite in float32"):
        fb.MLP.load(_npz(tmp_path / "s.npz", **fields))


def test_version_1_files_still_load(backend, tmp_path):
    net = fb.MLP([4, 3, 2], loss="cross_entropy", seed=1)
    fields = {key: value for key, value in _fields(net).items() if key in MEMBERS}
    fields["format_version"] = np.int64(1)
    back = fb.MLP.load(_npz(tmp_path / "v1.npz", **fields))
    _same_model(net, back)
    assert back.optimizer is None


def test_savez_compressed_files_load(net, tmp_path):
    np.savez_compressed(tmp_path / "c.npz", **_fields(net))
    _same_model(net, fb.MLP.load(tmp_path / "c.npz"))


def test_load_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no fastbp model at {str(tmp_path / 'nope.npz')!r}: no such file"):
        fb.MLP.load(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="a directory"):
        fb.MLP.load(tmp_path)


# ---------------------------------------------------------------- saving like np.save
@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_the_umask_permissions_like_np_save(backend, tmp_path, umask):
    """They used to be 0600 whatever the umask."""
    net = fb.MLP([3, 2], seed=0)
    old = os.umask(umask)
    try:
        net.save(tmp_path / "model.npz")
        np.save(tmp_path / "ref.npy", np.zeros(1))
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "model.npz").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "ref.npy").stat().st_mode) == 0o666 & ~umask


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_existing_files_keep_their_permissions(backend, tmp_path):
    net = fb.MLP([3, 2], seed=0)
    path = tmp_path / "model.npz"
    net.save(path)
    os.chmod(path, 0o640)
    net.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_saving_through_a_symlink_replaces_its_target(backend, tmp_path):
    """It used to replace the link itself with a regular file."""
    first, second = fb.MLP([3, 2], seed=0), fb.MLP([3, 2], seed=1)
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "real.npz"
    first.save(target)
    link = tmp_path / "current.npz"
    link.symlink_to(target)
    second.save(link)
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    _same_model(second, fb.MLP.load(target))
    _same_model(second, fb.MLP.load(link))
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["real.npz"]  # no temp left behind


def test_save_errors_name_the_users_path(backend, tmp_path):
    """They used to name the hidden temporary file."""
    net = fb.MLP([3, 2], seed=0)
    path = tmp_path / "no-such-dir" / "model.npz"
    with pytest.raises(FileNotFoundError, match=rf"cannot save the fastbp model to {str(path)!r}") as info:
        net.save(path)
    assert ".fastbp-" not in str(info.value)


def test_a_failed_write_leaves_nothing_and_names_the_path(backend, tmp_path, monkeypatch):
    net = fb.MLP([3, 2], seed=0)
    path = tmp_path / "model.npz"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match=rf"cannot save the fastbp model to {str(path)!r}: No space left"):
        net.save(path)
    assert list(tmp_path.iterdir()) == []


_KILLED_SAVE = """
import os, signal, sys
import fastbp as fb
fb.set_backend("numpy")
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # die between writing and renaming
fb.MLP([3, 2], seed=0).save(sys.argv[1])
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs kill -9")
def test_temp_files_of_killed_saves_of_the_same_path_are_removed(backend, tmp_path):
    path = tmp_path / "model.npz"
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".fastbp-") and left[0].endswith(".npz.tmp")
    # a save of another file in the same directory leaves it alone ...
    fb.MLP([3, 2], seed=0).save(tmp_path / "other.npz")
    assert left[0] in [p.name for p in tmp_path.iterdir()]
    # ... and so does a save of this path whose writer is still alive (here: this test's parent)
    alive = left[0].split(".")
    alive[2] = str(os.getppid())  # ["", "fastbp-<hash>", pid, random, "npz", "tmp"]
    (tmp_path / ".".join(alive)).write_bytes(b"")
    unrelated = tmp_path / ".fastbp-abcdefgh.npz.tmp"  # an old-style name: whose it was is unknown
    unrelated.write_bytes(b"")
    fb.MLP([3, 2], seed=0).save(path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([".".join(alive), unrelated.name, "model.npz", "other.npz"])
    _same_model(fb.MLP([3, 2], seed=0), fb.MLP.load(path))


def test_saves_from_threads_leave_one_whole_file(backend, tmp_path):
    import threading

    nets = [fb.MLP([30, 20, 5], seed=i) for i in range(4)]
    path = tmp_path / "model.npz"
    threads = [threading.Thread(target=lambda n=n: [n.save(path) for _ in range(5)]) for n in nets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    back = fb.MLP.load(path)
    assert any(all(np.array_equal(a, b) for a, b in zip(sum(back.get_params(), []), sum(n.get_params(), [])))
               for n in nets)
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


# ---------------------------------------------------------------- construction
def test_cross_entropy_with_one_output_is_refused_at_construction():
    """It used to be accepted and fail only at fit, with a misleading label message."""
    with pytest.raises(ValueError, match=r"loss='cross_entropy' needs at least 2 outputs.*Received: sizes=\[4, 3, 1\]"
                                         r".*loss='log_loss'"):
        fb.MLP([4, 3, 1], loss="cross_entropy")
    fb.MLP([4, 3, 2], loss="cross_entropy")


@pytest.mark.parametrize("sizes", [{4: 3, 3: 1}, {4, 1}, np.array([[4, 1]])])
def test_unordered_or_nested_sizes_are_refused(sizes):
    """A dict used to be read as its keys."""
    with pytest.raises(TypeError, match="sizes must be a (flat )?sequence of ints"):
        fb.MLP(sizes)


def test_pickle_round_trip_keeps_working(net):
    back = pickle.loads(pickle.dumps(net))
    _same_model(net, back)
    assert back.optimizer.steps == net.optimizer.steps


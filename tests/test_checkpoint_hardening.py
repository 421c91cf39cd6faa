"""fastopt.load on damaged, foreign and crafted files (one error type, sizes checked before
anything is decompressed) and fastopt.save's file handling (modes, symlinks, long names,
temporary files of killed saves)."""

import io
import json
import os
import stat
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

import fastopt
from fastopt import schedules as S

N = 16
SCHED = S.warmup(S.cosine(1e-2, 50), 5)
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes, pids, flock")


def _opt(p=None, **kwargs):
    p = np.linspace(-1, 1, N, dtype=np.float32) if p is None else p
    opt = fastopt.Adam(p, lr=SCHED, betas=(0.8, 0.99), amsgrad=True, **kwargs)
    opt.lr_scale, opt.max_grad_norm = 0.5, 2.0
    for k in range(3):
        opt.step(np.full(N, 0.1 * (k + 1), np.float32))
    return opt


def _saved(tmp_path, name="c.npz"):
    opt = _opt()
    path = tmp_path / name
    fastopt.save(opt, path)
    return path, opt


def _assert_same(back, opt, target):
    assert type(back) is type(opt) and back.step_count == opt.step_count
    assert back.defaults == opt.defaults and back.schedule == opt.schedule
    assert back.lr_scale == opt.lr_scale and back.max_grad_norm == opt.max_grad_norm
    assert sorted(back.state) == sorted(opt.state)
    for key in opt.state:
        np.testing.assert_array_equal(back.state[key], opt.state[key])
    np.testing.assert_array_equal(target, opt.params)


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def _members(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def _meta(members) -> dict:
    data = members["meta.npy"]
    return json.loads(np.lib.format.read_array(io.BytesIO(data)).tobytes())


def _write_zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _crafted(tmp_path, fields=None, drop=(), **arrays):
    """A copy of a valid checkpoint with meta fields and member arrays replaced."""
    path, _ = _saved(tmp_path)
    members = _members(path)
    if fields is not None:
        header = {**_meta(members), **fields}
        members["meta.npy"] = _npy(np.frombuffer(json.dumps(header).encode(), np.uint8))
    for key, value in arrays.items():
        members[f"{key}.npy"] = value if isinstance(value, bytes) else _npy(value)
    for key in drop:
        del members[f"{key}.npy"]
    return _write_zip(tmp_path / "crafted.npz", members)


def _refused(path, target=None, match=None, **kwargs):
    target = np.full(N, 7.0, np.float32) if target is None else target
    before = target.copy()
    with pytest.raises(fastopt.CheckpointError, match=match):
        fastopt.load(path, target, **kwargs)
    np.testing.assert_array_equal(target, before)  # nothing changed


# ----------------------------------------------------------------- A: one error type


def _structure_bytes(data: bytes) -> list[int]:
    """Offsets of every byte that is not array data: zip local headers, .npy headers, the
    central directory and its end record (where damage shows up in the most ways)."""
    offsets = []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            start = info.header_offset
            names = int.from_bytes(data[start + 26:start + 28], "little") \
                + int.from_bytes(data[start + 28:start + 30], "little")
            npy = start + 30 + names
            npy_header = 10 + int.from_bytes(data[npy + 8:npy + 10], "little")
            offsets += range(start, npy + npy_header)
        offsets += range(z.start_dir, len(data))
    return offsets


def test_single_byte_flips_and_truncations_raise_checkpoint_error_or_load_the_same(tmp_path):
    """Every header byte of a small checkpoint flipped (random xor), a few hundred flips
    anywhere, and truncations: load raises CheckpointError and leaves the params alone, or (a
    byte that does not matter, e.g. a zip timestamp) loads exactly the saved optimizer."""
    opt = fastopt.Adagrad(np.linspace(-1, 1, N, dtype=np.float32), lr=SCHED, lr_decay=0.1)
    opt.lr_scale, opt.max_grad_norm = 0.5, 2.0
    for k in range(3):
        opt.step(np.full(N, 0.1 * (k + 1), np.float32))
    path = tmp_path / "c.npz"
    fastopt.save(opt, path)
    data = path.read_bytes()
    structure = _structure_bytes(data)
    assert 500 < len(structure) < len(data) < 2000  # ~1 ms a load: a few seconds in all
    rng = np.random.default_rng(20240611)
    damaged = [("flip", k, int(rng.integers(1, 256))) for k in structure]
    damaged += [("flip", int(k), int(rng.integers(1, 256)))
                for k in rng.integers(0, len(data), 300)]
    damaged += [("flip", int(k), 0xFF) for k in rng.integers(0, len(data), 50)]
    damaged += [("truncate", k, 0) for k in [*range(0, len(data), 16),
                                             *range(len(data) - 30, len(data))]]
    bad = tmp_path / "bad.npz"
    loaded = others = 0
    for how, k, xor in damaged:
        raw = bytearray(data)
        if how == "flip":
            raw[k] ^= xor
        else:
            del raw[k:]
        bad.write_bytes(bytes(raw))
        target = np.full(N, 7.0, np.float32)
        try:
            back = fastopt.load(bad, target)
        except fastopt.CheckpointError:
            assert np.all(target == 7.0), (how, k, xor)
            continue
        except Exception as exc:  # the point: nothing but CheckpointError
            others += 1
            print(how, k, xor, type(exc).__name__, exc)
            continue
        assert how == "flip", k
        _assert_same(back, opt, target)
        loaded += 1
    assert others == 0, f"{others} damaged files raised something else than CheckpointError"
    assert 0 < loaded < len(damaged) // 3  # some bytes do not matter; most do


def test_a_missing_path_or_a_directory_raises_the_os_error(tmp_path):
    """Not a damaged file but no file: the OS's error, as np.load and torch.load raise it,
    so that `except FileNotFoundError:` can start a fresh run; save names the directory."""
    target = np.full(N, 7.0, np.float32)
    with pytest.raises(FileNotFoundError):
        fastopt.load(tmp_path / "missing.npz", target)
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(IsADirectoryError):
        fastopt.load(tmp_path / "dir.npz", target)
    with pytest.raises(IsADirectoryError, match="dir.npz is a directory"):
        fastopt.save(fastopt.AdamW(target), tmp_path / "dir.npz")
    assert np.all(target == 7.0)


def test_load_checks_the_optimizer_argument(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "c.npz"
    fastopt.save(fastopt.AdamW(np.ones(N, np.float32)), path)
    target = np.ones(N, np.float32)
    for optimizer, error, match in ((torch.optim.AdamW, TypeError, "torch.optim"),
                                    ("adamw", ValueError, "did you mean 'AdamW'"),
                                    ("Nope", ValueError, "one of Adadelta"),
                                    (5, TypeError, "got int 5"),
                                    (fastopt.Adam, fastopt.CheckpointError, "not Adam")):
        with pytest.raises(error, match=match):
            fastopt.load(path, target, optimizer=optimizer)
    assert isinstance(fastopt.load(path, target, optimizer=fastopt.AdamW), fastopt.AdamW)
    assert isinstance(fastopt.load(path, target, optimizer="AdamW"), fastopt.AdamW)


@pytest.mark.parametrize("kind", ["npy", "npz", "pickled", "zip", "text", "empty_zip"])
def test_foreign_files_raise_checkpoint_error(tmp_path, kind):
    path = tmp_path / "foreign.npz"
    if kind == "npy":  # np.load returns an ndarray, not an NpzFile (TypeError before)
        with open(path, "wb") as f:
            np.save(f, np.ones(N, np.float32))
    elif kind == "npz":
        np.savez(path, a=np.ones(N, np.float32), params=np.ones(N, np.float32))
    elif kind == "pickled":
        np.savez(path, meta=np.array([{"format": "fastopt-checkpoint"}], dtype=object))
    elif kind == "zip":
        _write_zip(path, {"readme.txt": b"hello"}, zipfile.ZIP_DEFLATED)
    elif kind == "text":
        path.write_text("params,1,2,3\n")
    elif kind == "empty_zip":
        _write_zip(path, {})
    _refused(path)


def test_deeply_nested_meta_json_raises_checkpoint_error(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000  # RecursionError in json before
    path, _ = _saved(tmp_path)
    members = _members(path)
    members["meta.npy"] = _npy(np.frombuffer(deep, np.uint8))
    _refused(_write_zip(tmp_path / "deep.npz", members))
    nested = {"format": "fastopt-checkpoint", "version": 1, "optimizer": "Adam",
              "hyperparameters": {}}
    text = json.dumps(nested).replace('"hyperparameters": {}',
                                      '"hyperparameters": ' + "[" * 100_000 + "]" * 100_000)
    members["meta.npy"] = _npy(np.frombuffer(text.encode(), np.uint8))
    _refused(_write_zip(tmp_path / "deep2.npz", members))


def _fake_npy(shape, descr="<f4", data=b"") -> bytes:
    """A .npy member whose header declares ``shape`` but holds only ``data``."""
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


@pytest.mark.parametrize("member", ["params", "exp_avg", "schedule", "meta"])
def test_a_huge_declared_shape_raises_checkpoint_error_not_memory_error(tmp_path, member):
    shape = (2**20, 9) if member == "schedule" else (2**46,)
    descr = {"schedule": "<f8", "meta": "|u1"}.get(member, "<f4")
    _refused(_crafted(tmp_path, **{member: _fake_npy(shape, descr, b"\0" * 64)}))


def test_a_compression_bomb_is_refused_before_decompressing(tmp_path):
    """A 32 MB params member deflated to ~30 kB: refused from its declared size alone."""
    path, _ = _saved(tmp_path)
    members = _members(path)
    count = 2**23
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            if name != "params.npy":
                z.writestr(name, data)
        with z.open("params.npy", "w") as f:
            f.write(_fake_npy((count,)))
            chunk = bytes(1 << 20)
            for _ in range(count * 4 // len(chunk)):
                f.write(chunk)
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        _refused(bomb, match="params")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # nothing near the 32 MB was decompressed


def _raw_npy(header: str, data: bytes = bytes(4 * N)) -> bytes:
    """A version-1.0 .npy member with this header text, taken as is."""
    text = header.encode("latin1")
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


@pytest.mark.parametrize("header", [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (16, }",  # tokenize.TokenError before
    "{'descr': '<f4', 'fortran_order': False, 'shape': (16,), '''}",  # TokenError too
    "{'descr': '<f4', 'fortran_order': False, 'shape': (16.5,), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (-16,), }",
    "{'descr': 'O', 'fortran_order': False, 'shape': (16,), }",
    "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (16,), }",
    "{'descr': '<f4', 'fortran_order': 0, 'shape': (16,), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 300 + "16" + ")" * 300 + "}",
    "[1, 2]", "",
])
def test_damaged_npy_headers_raise_checkpoint_error(tmp_path, header):
    _refused(_crafted(tmp_path, params=_raw_npy(header)))
    _refused(_crafted(tmp_path, exp_avg=_raw_npy(header)))


@pytest.mark.parametrize("step", [2**64, 2**63, -1, 1.5, True, "3", None])
def test_a_step_out_of_range_is_refused(tmp_path, step):
    # 2**64 loaded before, and then every step raised a Numba TypingError
    _refused(_crafted(tmp_path, fields={"step": step}), match="step")


def test_the_largest_valid_step_loads(tmp_path):
    back = fastopt.load(_crafted(tmp_path, fields={"step": 2**63 - 1}), np.zeros(N, np.float32))
    assert back.step_count == 2**63 - 1


@pytest.mark.parametrize("field, value", [
    ("lr_scale", float("inf")), ("lr_scale", float("nan")), ("lr_scale", -1.0),
    ("lr_scale", "1"), ("max_grad_norm", 0.0), ("max_grad_norm", -1.0),
    ("max_grad_norm", float("nan")), ("max_grad_norm", "2"), ("max_grad_norm", [2.0]),
    ("size", -1), ("size", "16"), ("size", 16.0), ("dtype", "float64"), ("dtype", None),
    ("state_dtype", "float16"), ("hyperparameters", [1, 2]),
    ("hyperparameters", {"betas": {"a": 1}}), ("hyperparameters", {"eps": [[1e-8]]}),
    ("hyperparameters", {"eps": 10**400}), ("hyperparameters", {"amsgrad": "false"}),
    ("hyperparameters", {"lr": 1.0}),
    ("hyperparameters", {"dtype": "float32"}), ("hyperparameters", {"nesterov": True}),
    ("optimizer", "SGD"), ("optimizer", ["Adam"]), ("version", "1"), ("format", None),
])
def test_meta_fields_of_the_wrong_type_or_range_are_refused(tmp_path, field, value):
    meta = {field: value}
    if field == "hyperparameters" and isinstance(value, dict):
        saved_hyper = _meta(_members(_saved(tmp_path)[0]))["hyperparameters"]
        meta = {field: {**saved_hyper, **value}}
    _refused(_crafted(tmp_path, fields=meta))


def test_meta_that_is_not_a_dict_or_too_big_is_refused(tmp_path):
    for text in (b"[1, 2]", b"null", b'"fastopt-checkpoint"', b"\xff\xfe{}",
                 b" " * ((1 << 20) + 1) + b"{}"):
        path, _ = _saved(tmp_path)
        members = _members(path)
        members["meta.npy"] = _npy(np.frombuffer(text, np.uint8))
        _refused(_write_zip(tmp_path / "m.npz", members))


@pytest.mark.parametrize("bad", ["float64", "complex64", "int32", "float16", "big_endian",
                                 "2d", "fortran_2d"])
def test_params_must_be_stored_exactly_as_save_writes_them(tmp_path, bad):
    """float64 or complex params were silently cast before."""
    values = np.linspace(-1, 1, N)
    array = {"float64": values, "complex64": values.astype(np.complex64),
             "int32": np.arange(N, dtype=np.int32), "float16": values.astype(np.float16),
             "big_endian": values.astype(">f4"), "2d": values.astype(np.float32).reshape(4, 4),
             "fortran_2d": np.asfortranarray(values.astype(np.float32).reshape(4, 4))}[bad]
    _refused(_crafted(tmp_path, params=array), match="params")


def test_16_bit_params_must_be_stored_as_their_uint16_bits(tmp_path):
    p = np.linspace(-1, 1, N).astype(np.float16)
    opt = fastopt.Adam(p, lr=SCHED)
    path = tmp_path / "h.npz"
    fastopt.save(opt, path)
    for target, kwargs in ((np.zeros(N, np.float16), {}),
                           (np.zeros(N, np.uint16), {"dtype": "float16"})):
        back = fastopt.load(path, target, **kwargs)
        np.testing.assert_array_equal(target.view(np.uint16), p.view(np.uint16))
        np.testing.assert_array_equal(back.state["master_param"], opt.state["master_param"])
    members = _members(path)
    members["params.npy"] = _npy(p)  # float16 values, not uint16 bits: was cast to integers
    _write_zip(tmp_path / "v.npz", members)
    _refused(tmp_path / "v.npz", np.zeros(N, np.float16), match="params")
    _refused(tmp_path / "v.npz", np.zeros(N, np.uint16), match="params", dtype="float16")


@pytest.mark.parametrize("member, array", [
    ("exp_avg", np.zeros(N, np.float64)), ("exp_avg", np.zeros(N, np.float16)),
    ("exp_avg", np.zeros(N - 1, np.float32)), ("exp_avg", np.zeros((N, 1), np.float32)),
    ("schedule", np.zeros((1, 9), np.float32)), ("schedule", np.zeros((1, 8), np.float64)),
    ("schedule", np.zeros((0, 9), np.float64)), ("schedule", np.full((1, 9), np.nan)),
])
def test_state_and_schedule_must_be_stored_exactly_as_save_writes_them(tmp_path, member,
                                                                       array):
    _refused(_crafted(tmp_path, **{member: array}))


@pytest.mark.parametrize("change", ["no_meta", "no_params", "no_exp_avg", "no_schedule",
                                    "foreign_member", "unused_state", "duplicate",
                                    "trailing_data", "header_too_big"])
def test_missing_extra_and_repeated_members_are_refused(tmp_path, change):
    if change.startswith("no_"):
        path = _crafted(tmp_path, drop=[change[3:]])
    elif change == "foreign_member":
        path = _crafted(tmp_path, extra=np.zeros(N, np.float32))
    elif change == "unused_state":  # max_exp_avg_sq, but amsgrad=False
        saved_hyper = _meta(_members(_saved(tmp_path)[0]))["hyperparameters"]
        path = _crafted(tmp_path, fields={"hyperparameters": {**saved_hyper, "amsgrad": False}})
    elif change == "trailing_data":
        path = _crafted(tmp_path, exp_avg=_npy(np.zeros(N, np.float32)) + b"\0" * 8)
    elif change == "header_too_big":
        header = {"descr": "<f4", "fortran_order": False, "shape": (N,), "x": "y" * 8000}
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
        path = _crafted(tmp_path, exp_avg=buf.getvalue() + bytes(4 * N))
    else:
        path, _ = _saved(tmp_path)
        members = _members(path)
        with pytest.warns(UserWarning, match="Duplicate name"):
            with zipfile.ZipFile(path, "a") as z:
                z.writestr("params.npy", _npy(np.zeros(N, np.float32)))
        assert len(zipfile.ZipFile(path).namelist()) == len(members) + 1
    _refused(path)


def test_save_refuses_what_load_would_refuse(tmp_path):
    opt = _opt()
    opt._lr_scale = float("inf")  # (the setter refuses it) a checkpoint of it would not load
    with pytest.raises(ValueError, match="lr_scale"):
        fastopt.save(opt, tmp_path / "c.npz")
    assert list(tmp_path.iterdir()) == []
    opt.lr_scale, opt.max_grad_norm = 1.0, float("inf")  # inf = no clipping: fine
    fastopt.save(opt, tmp_path / "c.npz")
    assert fastopt.load(tmp_path / "c.npz", np.zeros(N, np.float32)).max_grad_norm == np.inf
    # a torch optimizer (fastopt.torch's too) is refused with the way to save it
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    p = torch.nn.Parameter(torch.zeros(3))
    for other in (fot.AdamW([p]), torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))])):
        with pytest.raises(TypeError, match="state_dict"):
            fastopt.save(other, tmp_path / "t.npz")
    assert not (tmp_path / "t.npz").exists()


# ----------------------------------------------------------------- B: files that save writes


@posix_only
def test_save_keeps_the_mode_of_an_existing_file(tmp_path):
    path, opt = _saved(tmp_path)
    for mode in (0o640, 0o604, 0o600):
        path.chmod(mode)
        fastopt.save(opt, path)
        assert stat.S_IMODE(path.stat().st_mode) == mode


@posix_only
def test_a_new_file_gets_the_umask_mode(tmp_path):
    opt = _opt()
    for umask in (0o022, 0o027):
        old = os.umask(umask)
        try:
            fastopt.save(opt, tmp_path / f"new{umask}.npz")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / f"new{umask}.npz").stat().st_mode) == 0o666 & ~umask


@posix_only
def test_saving_through_a_symlink_writes_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "ckpt.npz"
    link = tmp_path / "latest.npz"
    link.symlink_to(os.path.join("real", "ckpt.npz"))  # dangling: save creates the target
    opt = _opt()
    fastopt.save(opt, link)
    assert link.is_symlink() and os.readlink(link) == os.path.join("real", "ckpt.npz")
    assert target.is_file() and not target.is_symlink()
    opt.step(np.ones(N, np.float32))
    fastopt.save(opt, link)  # an existing target is replaced, the link stays
    assert link.is_symlink()
    fresh = np.zeros(N, np.float32)
    assert fastopt.load(target, fresh).step_count == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.npz", "real"]
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["ckpt.npz"]


def test_a_255_byte_file_name_works(tmp_path):
    name = "c" * 251 + ".npz"
    path, opt = _saved(tmp_path, name)
    fastopt.save(opt, path)  # once more, over the existing file
    fresh = np.zeros(N, np.float32)
    _assert_same(fastopt.load(path, fresh), opt, fresh)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


@posix_only
def test_save_removes_temp_files_of_dead_writers_only(tmp_path):
    import fcntl

    dead = _dead_pid()
    stale = [f".fastopt-{dead}-0123abcd.tmp",
             f".fastopt-{os.getpid()}-89abcdef.tmp"]  # this pid, but no save of ours
    kept = [f".fastopt-{os.getppid()}-0123abcd.tmp",  # a live process's
            f".fastopt-{dead}-4567cdef.tmp",  # a dead pid, but locked: a live writer elsewhere
            f".fastopt-{dead}-fifo0000.tmp",  # not a regular file (and must not block us)
            ".fastopt-notes.tmp", ".c.npz.abcd1234.tmp", "other.tmp"]
    for name in stale + kept:
        if "fifo" not in name:
            (tmp_path / name).write_bytes(b"partial")
    os.mkfifo(tmp_path / f".fastopt-{dead}-fifo0000.tmp")
    with open(tmp_path / f".fastopt-{dead}-4567cdef.tmp", "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        path, _ = _saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [path.name])
    fastopt.save(_opt(), path)  # the lock is gone now: that file goes too
    assert f".fastopt-{dead}-4567cdef.tmp" not in os.listdir(tmp_path)


CHILD = r"""
import sys, time
import numpy as np
import fastopt

def stuck(f, **arrays):  # a save that hangs half-way through writing
    f.write(b"PK partial checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)

np.savez = stuck
fastopt.save(fastopt.Adam(np.ones(16, np.float32)), sys.argv[1])
"""


@posix_only
def test_a_save_killed_mid_write_leaves_a_temp_file_that_the_next_save_removes(tmp_path):
    path, opt = _saved(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastopt.__file__)), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        temp = [p.name for p in tmp_path.iterdir() if p.name != path.name]
        assert len(temp) == 1 and temp[0].startswith(f".fastopt-{child.pid}-"), temp
        fastopt.save(opt, path)  # a live writer's temp file stays
        assert (tmp_path / temp[0]).exists()
    finally:
        child.kill()  # SIGKILL: no cleanup handler runs
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -9
    assert (tmp_path / temp[0]).exists() and zipfile.is_zipfile(path)  # the old one intact
    fastopt.save(opt, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    fresh = np.zeros(N, np.float32)
    _assert_same(fastopt.load(path, fresh), opt, fresh)

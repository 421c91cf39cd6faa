"""Every CUDA source compiles with NVRTC (no GPU needed) with exactly the runtime options."""

import pytest

from fastopt.gpu import build

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings not installed")


def _check(result):
    err, *rest = result
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    return rest[0] if len(rest) == 1 else rest


def compile_source(name: str, arch: str, code: str | None = None):
    """(log, cubin or ptx bytes) for kernels/<name> (or ``code`` under that name) compiled for
    arch (sm_XX or compute_XX)."""
    code = build.source(name) if code is None else code
    prog = _check(nvrtc.nvrtcCreateProgram(code.encode(), name.encode(), 0, [], []))
    try:
        options = [o.encode() for o in (*build.nvrtc_options(), f"--gpu-architecture={arch}")]
        err, = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog))
        # NVRTC writes into the buffer it is given: a new bytearray, never a bytes object
        # (b" " * 1 is CPython's shared one-byte b" ", and writing the empty log's "\0"
        # into it turned every b" " of the process into b"\0": torch.save then wrote the
        # storage offset 32, chr(32) == " ", as 0)
        log = bytearray(size)
        _check(nvrtc.nvrtcGetProgramLog(prog, log))
        log = bytes(log).decode(errors="replace").rstrip("\x00").strip()
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{name} ({arch}) failed:\n{log}"
        if arch.startswith("sm_"):
            size = _check(nvrtc.nvrtcGetCUBINSize(prog))
            binary = bytearray(size)
            _check(nvrtc.nvrtcGetCUBIN(prog, binary))
        else:
            size = _check(nvrtc.nvrtcGetPTXSize(prog))
            binary = bytearray(size)
            _check(nvrtc.nvrtcGetPTX(prog, binary))
        return log, bytes(binary)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def test_headers_found():
    assert (build.kernel_dir() / "common.cuh").is_file()
    assert build.cuda_include_dir() is not None, "cuda_bf16.h not found (nvidia-cuda-runtime)"


# One source of each code shape the generator emits: elementwise with conditional state
# (Adam), per-step scalars (ASGD), train/eval modes (Schedule-Free), segments (LAMB),
# factored state (Adafactor), matrices (Muon), and the shared control kernels. These compile
# to sm_90 machine code (NVRTC's front end and ptxas) and to compute_80 PTX (the front end
# for sm_80's features, which a driver assembles for any later card). The other elementwise
# sources differ from Adam's only in their update's arithmetic: they compile to compute_90
# PTX, NVRTC's whole front end for sm_90 without ptxas, which took two thirds of an sm_90
# compile (adam.cu 25.7 s against 10.0 s while CI-like load ran beside it). Their sm_90
# machine code (40 s of CI's CPU) and compute_80 PTX (30 s) were dropped for CI's 10 minutes;
# on a GPU the runtime builds every source for its card (tests/test_gpu.py).
SHAPE_SOURCES = {"adam.cu", "asgd.cu", "adamwschedulefree.cu", "lamb.cu", "adafactor.cu",
                 "muon.cu", "control.cu"}


@pytest.mark.parametrize("name,arch", [
    *((n, "sm_90" if n in SHAPE_SOURCES else "compute_90") for n in sorted(build.SOURCES)),
    *((n, "compute_80") for n in sorted(SHAPE_SOURCES))])
def test_compiles_without_warnings(name, arch):
    log, binary = compile_source(name, arch)
    assert "warning" not in log.lower(), log
    for kernel in build.SOURCES[name]:
        assert kernel.encode() in binary, f"{kernel} missing from {name} ({arch})"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("state_bf16", [False, True])
def test_launch_names_compiled_kernels(dtype, state_bf16):
    """The launcher picks kernels by the params' format (uint16 bits are named by theirs)."""
    from fastopt.algorithms import REGISTRY
    from fastopt.gpu.launch import kernel_name

    for op, definition in REGISTRY.items():
        names = build.SOURCES[f"{op}.cu"]
        if definition.factored is not None and state_bf16:  # (float32 state only)
            assert kernel_name(op, dtype, state_bf16) not in names
            continue
        assert kernel_name(op, dtype, state_bf16) in names
        if definition.segmented:
            assert kernel_name(f"{op}_reduce", dtype, state_bf16) in names
            assert f"{op}_segment" in names
        if definition.factored is not None:
            assert {kernel_name(f"{op}_stats", dtype), f"{op}_fold", f"{op}_means"} <= set(names)
    with pytest.raises(ValueError, match="no GPU kernel for uint16"):
        kernel_name("adam", "uint16")


def test_wheel_ships_the_cuda_sources(tmp_path):
    """The wheel carries kernels/ as fastopt/_kernels (what build.kernel_dir() loads when
    installed) with every source the launcher names."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(build.__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                           str(tmp_path), str(root)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = tmp_path.glob("fastopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in (*build.SOURCES, "common.cuh", "schedule.cuh"):
        assert f"fastopt/_kernels/{source}" in names, source

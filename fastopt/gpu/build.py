"""Where the CUDA sources are, which kernels they define, and the NVRTC options: one place
for the runtime loader and the compile checks that run without a GPU."""

from __future__ import annotations

import importlib.util
import os
from importlib import resources
from pathlib import Path

from ..algorithms import REGISTRY


def _entry_points(op: str, definition) -> tuple[str, ...]:
    """The extern "C" kernels of ``<op>.cu``: each pass that reads params (the update, a
    tensor-aware kernel's first pass, factored statistics) per format, ``<pass>_<param
    dtype>`` with float32 state and ``..._sbf16`` with bfloat16 state (factored moments:
    float32 state only), ``<op>_int8_<param dtype>`` with int8 state (the elementwise
    definitions), ``<op>_multi_...`` and ``<op>_int8_multi_...`` the multi-tensor launch's (the
    definitions with one: Definition.multi_launch); the passes that read none once
    (``<op>_segment``, ``<op>_fold``, ``<op>_means``). fastopt.gpu.launch.segmented_passes
    launches them in order."""
    factored = definition.factored is not None
    typed = [op, *([f"{op}_reduce"] if definition.segmented else []),
             *([f"{op}_stats"] if factored else [])]
    untyped = [*([f"{op}_segment"] if definition.segmented else []),
               *([f"{op}_fold", f"{op}_means"] if factored else [])]
    states = ("",) if factored else ("", "_sbf16")
    int8 = [f"{op}_int8_{d}" for d in DTYPE_SUFFIXES] if definition.int8_refusal is None else []
    # the multi-tensor launch's (MULTI_SIGNATURE), of the definitions that have one
    multi = [f"{op}_multi_{d}{s}" for d in DTYPE_SUFFIXES for s in states] \
        + [f"{op}_int8_multi_{d}" for d in DTYPE_SUFFIXES if int8] \
        if definition.multi_launch else []
    return (*(f"{t}_{d}{s}" for t in typed for d in DTYPE_SUFFIXES for s in states), *int8,
            *multi, *untyped)


#: CUDA source file -> the extern "C" kernels it defines (``_entry_points``)
DTYPE_SUFFIXES = ("f32", "f16", "bf16")
SOURCES = {f"{op}.cu": _entry_points(op, definition) for op, definition in REGISTRY.items()}
#: the driver's own kernels: a step's gradient norm, clip coefficient and skip flag
SOURCES["control.cu"] = (*(f"fo_grad_sq_{d}" for d in DTYPE_SUFFIXES), "fo_grad_control")


def kernel_dir() -> Path:
    """The kernels/ folder: shipped in the wheel as fastopt/_kernels, or the source checkout's."""
    packaged = resources.files("fastopt") / "_kernels"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "kernels"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("fastopt's CUDA sources (kernels/) are missing from this install")


def cuda_include_dir() -> Path | None:
    """A folder with cuda_fp16.h / cuda_bf16.h: the nvidia-cuda-runtime wheel or a toolkit."""
    candidates = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates += sorted(Path(root).glob("cu*/include"), reverse=True)
            candidates.append(Path(root) / "cuda_runtime" / "include")
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda_bf16.h").is_file():
            return c
    return None


def nvrtc_options() -> tuple[str, ...]:
    """The options every kernel is compiled with (the architecture is added by the caller)."""
    # -default-device: the per-group lambdas inside the kernels are device code.
    # --fmad=false: no FMA contraction, so an element gets the same IEEE operations in the
    # vector body and in the scalar tail (NVRTC contracted the two differently: 1 ulp apart on
    # an H200) and the same as the g++ -ffp-contract=off host build; it costs no time
    # (bench/NOTES.md 18)
    options = ["--std=c++17", "-default-device", "--fmad=false", f"-I{kernel_dir()}"]
    include = cuda_include_dir()
    if include is not None:
        options.append(f"-I{include}")
    return tuple(options)


def source(name: str) -> str:
    return (kernel_dir() / name).read_text()

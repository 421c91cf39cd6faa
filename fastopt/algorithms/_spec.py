"""The vocabulary of an optimizer definition (one module per optimizer in this package).

A definition declares what is particular to one optimizer and nothing else:

- ``name`` (the kernel's and the functional function's name) and ``classes``: the public class
  names with their own defaults (``AdamW`` is the ``adam`` definition with decoupled decay);
- ``hypers``: the hyperparameters in the public argument order, with torch's defaults and
  validation (each ``check`` raises torch's ``ValueError``);
- ``state``: torch's state names in kernel order, each buffer's initial value and the condition
  under which it exists;
- ``prologue``: a function of ``step`` (the 1-based step, float64), ``lr`` (the scheduled lr
  times ``lr_scale``) and the kernel hyperparameters, run once per kernel call in float64;
  every name it assigns is available to ``element``;
- ``element``: the per-element update. Its positional parameters are ``p``, ``g`` and the state
  names; it reassigns them (float32 values) and the driver stores what it reassigned.

``prologue`` and ``element`` are written in a small subset of Python (assignments, ``if``,
arithmetic, comparisons, ``sqrt``/``min``/``max``/``abs``/``sign``/``log``/``exp``) that
``fastopt.codegen`` turns into the Numba kernel (``fastopt/cpu/ops/``) and the CUDA kernel
(``kernels/``). What every
optimizer shares lives in the driver there, written once: gradient sign (``maximize``) and
multiplier (loss-scale unscaling, clipping), weight decay (L2 into ``g`` or decoupled
``p *= 1 - lr * wd``), 16-bit params with a float32 master, the state formats, the schedule,
the step counter, the serial/parallel loops and the GPU's vector access.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: the kernels' fixed hyperparameter slots (h0..h7): a definition uses at most this many
KERNEL_SLOTS = 8
#: the kernels' fixed state-buffer slots (state0..state3)
STATE_SLOTS = 4
#: the kernels' per-step scalar slots (scalar0..scalar3: one float64 each, on the device)
SCALAR_SLOTS = 4
#: weight decay forms the driver applies: "l2" (added to the gradient), "decoupled"
#: (p *= 1 - lr * wd before the update), "choice" (a ``decoupled_weight_decay`` hyper), or
#: "own": the driver applies none, and the prologue and element read ``weight_decay``
#: (Schedule-Free's decay at y, neither L2 nor decoupled)
DECAY_FORMS = ("l2", "decoupled", "choice", "own")
#: a state buffer's ``init`` that means "the first gradient" (SGD's momentum_buffer)
FIRST_GRAD = "first_grad"
#: ``init`` values that mean "the lr of the first step" (Rprop's step_size) and "a copy of the
#: params" (Schedule-Free's z); the optimizer classes fill such buffers (fastopt.<Name> at
#: construction, fastopt.torch.<Name> at the param's first step, as torch does)
INIT_LR = "lr"
INIT_PARAMS = "params"
#: the float32 master copy of 16-bit params: its state name in every layer (core optimizers,
#: functional keyword, fastopt.torch, checkpoints), and its former spellings, accepted with a
#: DeprecationWarning for one release
MASTER = "master_param"
MASTER_ALIASES = ("master_params", "master")
#: how 16-bit params keep their float32 values (``master_weights=``): "fp32", a float32
#: master (MASTER, 4 B/param); "remainder" (bfloat16 params only), the master's low 16 bits
#: beside the bf16 param (REMAINDER, int16, 2 B/param: param and remainder make the master
#: exactly, the param being the master rounded to nearest, ties away from zero); "none": no
#: master, the params written with stochastic rounding (PARAM_SALT). The first is the default.
MASTER_WEIGHTS = ("fp32", "remainder", "none")
#: the remainder's live state name (fastopt.<Name>.state, fastopt.torch's state, checkpoints);
#: state dicts give the float32 master it makes under MASTER instead
REMAINDER = "master_remainder"
#: the kernels' ``master_mode`` (CUDA: which of MASTER_WEIGHTS the ``master`` pointer holds:
#: float32 master, int16 remainders, or nothing; the CPU kernels tell by its dtype)
MASTER_MODES = {mode: i for i, mode in enumerate(MASTER_WEIGHTS)}
#: salt of the random bits of master_weights="none"'s param rounding (the step's seed ^ salt),
#: apart from the state's
PARAM_SALT = 0x27D4EB2F
#: the kernels' ``fresh`` argument: whether FIRST_GRAD state is still unset (0: no, 1: yes,
#: 2: exactly at step 1, judged by the kernel from its step counter, so a captured CUDA
#: graph replays it right)
FRESH_NO, FRESH_YES, FRESH_AT_FIRST_STEP = 0, 1, 2

#: The one kernel signature every optimizer has, CPU and CUDA alike: (name, C type). ``T`` is
#: the params' element type, ``S`` the state's (float, or bfloat16 bits). Unused state slots
#: and hyperparameter slots are passed but never read. ``control`` (CUDA only): two device
#: doubles, a factor on ``grad_mult`` (the clip coefficient) and a skip flag (non-finite
#: gradients: the kernel changes nothing, not even the step counter), computed on the device
#: so a clipped or skippable step needs no host sync. ``master_mode`` (CUDA only,
#: MASTER_MODES): what ``master`` holds for 16-bit params (float32 master, int16 remainders,
#: or nothing); the CPU kernels tell by the array's dtype. The CPU kernels take the same names
#: (scalars as Python numbers) plus ``fmt`` and ``parallel``, with ``step`` in place of
#: ``table_rows``/``step_state``/``lr_out``/``control``/``master_mode``.
KERNEL_SIGNATURE: tuple[tuple[str, str], ...] = (
    ("params", "T*"), ("grads", "const T*"), ("master", "float*"),
    *((f"state{i}", "S*") for i in range(STATE_SLOTS)),
    *((f"scalar{i}", "double*") for i in range(SCALAR_SLOTS)),
    ("table", "const double*"), ("table_rows", "int"),
    ("step_state", "unsigned long long*"), ("lr_out", "double*"),
    ("lr_scale", "double"), ("grad_mult", "double"), ("control", "const double*"),
    ("weight_decay", "double"),
    ("decoupled", "int"), ("maximize", "int"), ("fresh", "int"), ("master_mode", "int"),
    *((f"h{i}", "double") for i in range(KERNEL_SLOTS)),
    ("n", "long long"),
)
#: the CPU kernels' arguments that change from step to step (the rest are fixed per optimizer)
CPU_PER_STEP = ("grads", "table", "step", "lr_scale", "grad_mult", "fresh", "parallel")
#: the CPU kernels' arguments: the uniform names (no device step counter, lr output or n),
#: ``fmt`` (the 16-bit format), ``l2`` and the per-step ones last, so a caller packs the
#: fixed part once (fastopt.engine). ``l2``: the L2 weight decay factor added to the
#: gradient as a float32, or None where the step adds no such term (weight decay 0,
#: decoupled decay, a definition without L2 decay: ``fastopt.engine.l2_term``). None is a
#: type of its own, so those kernels compile no term at all, as torch adds none (an inf
#: param then stays inf, where 0 * inf would make it NaN), while the loop stays one LLVM
#: vectorises (a runtime guard on the term did not, bench/NOTES.md)
CPU_SIGNATURE: tuple[str, ...] = tuple(
    name for name, _ in KERNEL_SIGNATURE
    if name not in ("table_rows", "step_state", "lr_out", "control", "master_mode", "n",
                    *CPU_PER_STEP)
) + ("fmt", "l2", *CPU_PER_STEP)
#: the CPU int8-state kernels' arguments (``<name>_int8``): CPU_SIGNATURE with each state
#: slot's block scales (float32, one absmax per INT8_BLOCK elements) before the per-step ones;
#: ``state<k>`` then holds the codes (uint8)
INT8_SCALES = tuple(f"scale{i}" for i in range(STATE_SLOTS))
CPU_INT8_SIGNATURE: tuple[str, ...] = CPU_SIGNATURE[:-len(CPU_PER_STEP)] + INT8_SCALES \
    + CPU_PER_STEP
#: what an int8-state CUDA kernel (``<name>_int8_<format>``) takes after KERNEL_SIGNATURE:
#: each state slot's block scales (its ``state<k>`` holds the codes, ``S`` = unsigned char)
INT8_SIGNATURE: tuple[tuple[str, str], ...] = tuple((name, "float*") for name in INT8_SCALES)
#: What a tensor-aware (segmented) kernel takes after the uniform signature, CUDA and CPU
#: alike (fastopt/segments.py): the segment table (``segments``: offset, batch, rows, cols,
#: first and end chunk per tensor) and the chunk table (``chunks``: start, stop, segment),
#: the float64 partial sums of each chunk (``partials``, chunks x reductions), the values
#: the ``segment`` function computes per tensor (``segvals``, tensors x values) and, for a
#: definition with a matrix stage (Muon), the float32 ``direction`` each tensor's matrix is
#: made from (n elements; a one-element stand-in for the others). On the CPU
#: the table sizes are the arrays' shapes; CUDA takes ``n_segments`` (the chunk count is the
#: reduce and update launches' grid).
SEGMENT_SIGNATURE: tuple[tuple[str, str], ...] = (
    ("segments", "const long long*"), ("chunks", "const long long*"),
    ("n_segments", "long long"), ("partials", "double*"), ("segvals", "double*"),
    ("direction", "float*"),
)
#: What a kernel with factored moments (Adafactor) takes after SEGMENT_SIGNATURE on CUDA
#: (``SegmentTable.gpu_plan`` in fastopt/segments.py makes the tables, kernels/factored.cuh
#: reads them): ``layout`` (each tensor's row, col and variance offsets in the packed state,
#: ``SegmentTable.factored_layout``), ``factored`` (1 for a tensor of 2 or more dims), ``fold``
#: (per tensor: where its strips' row sums and its row tiles' column sums start, and how many
#: strips and row tiles it has), ``tiles`` (the statistics pass's work, a block each) and
#: ``means`` (the row-mean pass's, a block each); the float64 row and column sums of g^2
#: (``row_sq``, ``col_sq``), the tiles' partial sums of them (``tile_row_sums``,
#: ``tile_col_sums``), each row's float32 row-factor mean (``row_norm``) and the two factor
#: counts (``n_rows``, ``n_cols``: the fold pass's thread per row and per column).
FACTORED_SIGNATURE: tuple[tuple[str, str], ...] = (
    ("layout", "const long long*"), ("factored", "const long long*"),
    ("fold", "const long long*"), ("tiles", "const long long*"), ("means", "const long long*"),
    ("row_sq", "double*"), ("col_sq", "double*"), ("tile_row_sums", "double*"),
    ("tile_col_sums", "double*"), ("row_norm", "float*"),
    ("n_rows", "long long"), ("n_cols", "long long"),
)
#: the CPU segmented kernels' arguments: CPU_SIGNATURE with the tables and buffers before the
#: per-step arguments (they are fixed per optimizer)
CPU_SEGMENT_ARGS = ("segments", "chunks", "partials", "segvals", "direction")
CPU_SEGMENTED_SIGNATURE: tuple[str, ...] = (
    CPU_SIGNATURE[:-len(CPU_PER_STEP)] + CPU_SEGMENT_ARGS + CPU_PER_STEP)
#: a segmented definition computes at most this many per-tensor sums and values
REDUCTION_SLOTS = 4
#: what the first pass of a definition with a matrix stage assigns per element: the stage's
#: input, stored to the ``direction`` buffer
DIRECTION = "direction"
#: the tensor shape values a ``segment`` function may take after its reductions
SEGMENT_SHAPE_INPUTS = ("numel", "rows", "cols")
#: threads per block of the CUDA reduce and update passes (one block per chunk)
SEGMENT_BLOCK = 256
#: the most threads per block of the gradient-norm kernels (kernels/control.cu): the size of
#: their shared arrays of per-thread sums
REDUCE_THREADS = 256
#: a state buffer's layouts (State.layout)
STATE_LAYOUTS = ("elements", "rows", "cols", "unfactored")
#: a factored definition's eps1 slot value meaning "the params' format's machine epsilon"
#: (torch's eps1=None: finfo(param dtype).eps), resolved by the kernel from the format
FORMAT_EPS = -1.0
#: which 16 of each element's 32 random bits the bf16 rounding of state slot k takes
STATE_RANDOM_SHIFTS = (0, 16, 8, 4)
#: int8 state (``state_dtype="int8"``): each state buffer is cut into blocks of INT8_BLOCK
#: elements; a block keeps its float32 absmax and one byte per element, an 8-bit float of
#: y = x / absmax (|y| <= 1): code 0 is 0, code c > 0 is 2^(e - 2^E + 1) (1 + f / 2^M) with
#: e = (c >> M) & (2^E - 1) and f = c & (2^M - 1); a signed state's bit 7 is the sign.
#: Encoded branch-free from the float's bits (bench/NOTES.md, "8-bit state: the codes").
INT8_BLOCK = 256
#: the codes' mantissa bits (M), and exponent bits (E) by State.sign: E4M3 for signed states
#: (values down to 2^-14 of the absmax), E5M3 for non-negative ones (down to 2^-30: second
#: moments span the squares of the gradients' range)
INT8_MANTISSA_BITS = 3
INT8_EXPONENT_BITS = {"signed": 4, "nonnegative": 5}
#: each state slot's salt of the stochastic rounding's random bits (the step's seed ^ salt)
INT8_SALTS = (0x00000000, 0x632BE5AB, 0x85EBCA77, 0xC2B2AE3D)
#: the code's version, recorded in checkpoints and state dicts with the raw codes
INT8_CODE_VERSION = 1
#: The multi-tensor launch (CUDA entry points ``<name>_multi_<format>[_sbf16]`` and
#: ``<name>_int8_multi_<format>``): one launch over many tensors that fastopt does not own
#: (fastopt.torch's ``multi_tensor=True``), as torch's ``multi_tensor_apply``. It takes the
#: uniform signature (and an int8 kernel's scales), whose buffer pointers and ``n`` it does not
#: read, then MULTI_SIGNATURE: ``tensors``, a row of MULTI_TABLE per tensor (its buffers'
#: addresses and its element count, as int64), and ``chunks``, a row of MULTI_CHUNK_ROW per
#: CUDA block (its tensor's row, the first and the stop element of its chunk). Each block
#: steps its chunk of its tensor with the tensor's own element indices, so the random bits of
#: a stochastic rounding are those of a launch over that tensor alone. Every other argument
#: (step counter, schedule, hyperparameters, ``fresh``, ``master_mode``) is the launch's, shared
#: by its tensors: they take the same step. Definitions with per-step scalars (kept per
#: tensor, written by a launch's last block) and tensor-aware ones have no such entry point.
MULTI_TABLE = ("params", "grads", "master", *(f"state{i}" for i in range(STATE_SLOTS)),
               *INT8_SCALES, "n")
MULTI_CHUNK_ROW = ("tensor", "first", "stop")
MULTI_SIGNATURE: tuple[tuple[str, str], ...] = (("tensors", "const long long*"),
                                                ("chunks", "const long long*"))
#: elements per chunk of a multi-tensor launch (torch's multi_tensor_apply takes 65536); a
#: multiple of INT8_BLOCK and of every vector width, so chunks split no int8 block or vector
MULTI_CHUNK = 65536
if MULTI_CHUNK % INT8_BLOCK or MULTI_CHUNK % 8:
    raise ImportError("MULTI_CHUNK must be a multiple of INT8_BLOCK and of 8")
#: the state formats every layer takes (``state_dtype=``)
STATE_DTYPES = ("float32", "bfloat16", "int8")


def sign(x: float) -> float:
    """The definition subset's sign(), as torch.sign: 1.0, -1.0, or 0.0 for +-0 and NaN.
    Definitions import it so their functions are plain Python; the generator translates the
    call (``fo_sign``: fastopt.cpu.convert's for Numba, kernels/common.cuh's for CUDA)."""
    return 1.0 if x > 0 else -1.0 if x < 0 else 0.0


@dataclass(frozen=True)
class Hyper:
    """A hyperparameter: its name, torch's default, its check, and how the kernel sees it.

    ``slots``: the kernel's names for its value (``betas`` -> ``beta1``, ``beta2``); empty for
    the ones the driver consumes (``weight_decay``, ``maximize``, ``decoupled_weight_decay``)
    or that never reach a kernel. ``flag``: a bool (the kernel gets 0/1, the element a bool).
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    slots: tuple[str, ...] = ()
    flag: bool = False
    #: the value the kernel computes with, if it differs (eps: floored, see kernel_eps)
    to_kernel: Callable[[Any], Any] | None = None
    #: a None in its first slot means the params' format's machine epsilon (torch's
    #: ``finfo(param.dtype).eps``, Adafactor's eps1): the kernel gets FORMAT_EPS and resolves
    #: it from the format it updates (float32, float16 or bfloat16)
    format_eps: bool = False


def _flag(name: str, value) -> bool:
    """A flag hyperparameter (``check=bool``): True or False, as torch reads them: numpy's
    and torch's one-element values, the numbers 0 and 1 (fastopt.torch hands a tensor's
    value over as a float) and None (False); anything else, e.g. the string "False", whose
    truth would turn the option on, is a TypeError."""
    given = value
    if value is None:
        return False
    if not isinstance(value, (bool, int, float)) and hasattr(value, "item"):
        try:
            value = value.item()  # (numpy's or torch's one element; more raise)
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(given).__name__} {given!r}")


@dataclass(frozen=True)
class State:
    """A state buffer: torch's name, its initial value (a number, the name of a hyper whose
    value it starts at, FIRST_GRAD, INIT_LR or INIT_PARAMS), and ``when``: None, or a
    condition on the kernel's
    hyperparameters (Python and C syntax alike, e.g. ``"amsgrad"``, ``"momentum != 0.0"``)
    under which the buffer exists."""

    name: str
    init: float | str = 0.0
    when: str | None = None
    #: former spellings of the functional layer's argument, accepted with a
    #: DeprecationWarning for one release (Adagrad's ``state_sum``)
    aliases: tuple[str, ...] = ()
    #: what the buffer holds (STATE_LAYOUTS): a value per element of the params ("elements"),
    #: or, for factored second moments, a value per row or per column of each tensor of 2 or
    #: more dims ("rows", "cols") or per element of the others ("unfactored"), packed in
    #: tensor order as ``SegmentTable.factored_layout()`` lays them out
    layout: str = "elements"
    #: the sign of its values: "signed", or "nonnegative" (second moments, accumulators),
    #: which int8 state encodes with one more exponent bit in place of the sign
    sign: str = "signed"
    #: False for a buffer holding param values (Schedule-Free's z, ASGD's average): eight
    #: bits cannot carry params, so int8 state is refused for its optimizer
    quantizable: bool = True


@dataclass(frozen=True)
class Scalar:
    """A per-step scalar the kernel carries from one step to the next (NAdam's
    ``mu_product``): float64, one value per optimizer, kept where the params are (a one-element
    device array on a GPU, so a captured graph replays it). The prologue reads it under its
    name and reassigns it to its value after this step; the kernel stores what it assigned (on
    a GPU the last block, once every block has read the old value)."""

    name: str
    init: float = 0.0
    #: where torch-style implementations keep it: False, per param (torch's NAdam keeps
    #: mu_product in each param's state); True, in the param group (schedulefree keeps
    #: weight_sum and lr_max there). fastopt.torch shows it in the same place.
    group: bool = False


@dataclass(frozen=True)
class Modes:
    """Train and eval modes (Schedule-Free): while training the params hold the point the
    gradients are taken at (y), for evaluation another one (x). ``train()`` and ``eval()``
    move them, ``p <- lerp(p, state[lerp_to], weight)`` in float32 with torch.lerp's
    formula, the weight a function of the checked hyperparameters. An optimizer starts in
    eval mode; ``step()`` in eval mode raises ``RuntimeError``. ``group_key``: the param
    group's key for the mode in fastopt.torch (schedulefree's ``train_mode``)."""

    lerp_to: str
    to_train: Callable[[dict], float]
    to_eval: Callable[[dict], float]
    group_key: str = "train_mode"


def lerp(start, end, weight: float):
    """torch.lerp's formula (float32 arrays, a float weight): ``start + w (end - start)``
    for |w| < 0.5, else ``end - (end - start)(1 - w)``, so w = 1 gives ``end`` exactly."""
    # (Python floats are weak scalars: the arithmetic stays in the arrays' float32)
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * float(np.float32(1.0) - np.float32(weight))


@dataclass(frozen=True)
class MatrixStage:
    """A host stage per 2-D tensor between a tensor-aware definition's first pass and its
    update (Muon's Newton-Schulz orthogonalisation): matrix multiplications, which belong to
    BLAS/cuBLAS, not to an elementwise kernel. The first pass assigns ``direction`` per
    element (stored as float32); each tensor's direction, as a (rows, cols) matrix, goes
    through the stage; the update pass reads the stage's result as ``g``.

    ``numpy(matrix, hypers)``: the stage on a float32 numpy or cupy matrix (the core
    optimizers and the functional layer); ``torch(matrix, hypers)``: on a float32 torch
    tensor (fastopt.torch, which computes as its torch twin does). Both return a matrix of
    the same shape; ``hypers`` are the checked hyperparameters. A definition with a matrix
    stage takes 2-D tensors only; ``only_2d`` is its refusal of others (torch's message)."""

    numpy: Callable
    torch: Callable
    only_2d: str


@dataclass(frozen=True)
class TorchTwin:
    """The torch.optim class a public class equals, and what ``fastopt.torch`` copies of its
    behaviour: the group keys torch's ``__setstate__`` fills in for state dicts of older torch
    versions, whether torch creates the state at construction (Adagrad) rather than at the
    first step, whether its capturable check lists XLA among the supported devices, and
    whether it refuses betas mixing floats and tensors."""

    name: str
    group_defaults: dict = field(default_factory=dict)
    state_at_construction: bool = False
    capturable_xla: bool = True
    #: torch's constructor wants ``betas`` both floats or both tensors (Adam, AdamW)
    betas_same_kind: bool = False
    #: what torch's capturable check names (ASGD: "params, mus, etas, and state_steps")
    capturable_what: str = "params and state_steps"


@dataclass(frozen=True)
class ClassSpec:
    """A public class over a definition: its own defaults and the values it fixes."""

    name: str
    doc: str
    defaults: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    #: the options ``fastopt bench`` times it with (beyond the defaults)
    bench: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Definition:
    name: str
    doc: str  # the formula, for docstrings
    classes: tuple[ClassSpec, ...]
    hypers: tuple[Hyper, ...]
    state: tuple[State, ...]
    decay: str
    prologue: Callable
    element: Callable
    lr_default: float
    #: a check across hyperparameters (torch's messages), after each one's own check
    validate: Callable[[dict], None] | None = None
    #: whether fastopt.torch runs ``validate`` only on its constructor's arguments, as torch
    #: does (SGD's Nesterov check): a param group's own values, or values changed later,
    #: are taken as torch takes them
    validate_at_construction_only: bool = False
    #: per-step scalars (see Scalar), in kernel slot order
    scalars: tuple[Scalar, ...] = ()
    #: public class name -> its torch.optim twin (tests, bench and fastopt.torch use it)
    torch_twin: dict[str, TorchTwin] = field(default_factory=dict)
    #: False where the lr only seeds the state (Rprop's step_size): a schedule is refused
    schedulable: bool = True
    #: train/eval modes (Schedule-Free), or None
    modes: Modes | None = None
    #: the param-group key under which torch-style implementations count the group's steps
    #: (schedulefree's ``k``), or None (torch's per-param ``step``)
    group_step: str | None = None
    #: other param-group keys the torch-style implementation reads (schedulefree's
    #: ``foreach``): fastopt.torch's groups carry them, so its state dicts load there
    group_keys: dict = field(default_factory=dict)
    #: param-group keys of the torch-style implementation that change how weight decay
    #: applies, with the value fastopt implements (pytorch-optimizer's AdEMAMix
    #: ``weight_decouple=True``): fastopt.torch's groups carry them, and a group with
    #: weight_decay != 0 and another value is refused (ValueError) at its next step
    decay_keys: dict = field(default_factory=dict)
    #: the param-group key under which the torch-style implementation counts steps for the
    #: whole group where fastopt counts them per param (pytorch-optimizer's AdEMAMix
    #: ``step``): fastopt.torch's state dicts save there the most steps a param of the group
    #: took, and a loaded entry without a ``step`` of its own takes the group's count
    saved_group_step: str | None = None
    #: Tensor-aware optimizers (LAMB): per-tensor sums over a segment table. ``reductions``
    #: names the float64 sums; ``reduce`` (parameters as ``element``'s) runs first over every
    #: element, assigns each reduction name its element's contribution and may reassign
    #: state (stored then); ``segment`` (in float64, once per tensor) takes the sums
    #: positionally (and ``numel``, the tensor's size, if it names it) plus keyword-only
    #: prologue values and hyperparameters, and assigns the per-tensor values the element,
    #: run second, takes as keywords (LAMB's ``trust_ratio``). Such a definition applies its
    #: weight decay itself (decay "own").
    reductions: tuple[str, ...] = ()
    reduce: Callable | None = None
    segment: Callable | None = None
    #: a host stage per 2-D tensor between the first pass and the update (see MatrixStage):
    #: the first pass (``reduce``) then assigns ``direction``, and may have no reductions
    matrix: MatrixStage | None = None
    #: factored second moments (Adafactor): the module with the math the factored driver
    #: calls (``moment``, ``estimate``, ``direction``; ``prologue``, ``segment`` and
    #: ``element`` are the definition's own), its state in the "rows", "cols" and
    #: "unfactored" layouts; generated by ``fastopt.codegen.factored_numba_source``
    factored: Any = None
    #: whether torch-style implementations keep a per-param ``step`` in the state. torch's
    #: Muon keeps none: fastopt.torch then counts the steps (for the in-kernel schedule) out of
    #: sight and saves the count in its state dicts' param groups (``fastopt_step``)
    per_param_step: bool = True

    def __post_init__(self):
        if self.decay not in DECAY_FORMS:
            raise ValueError(f"{self.name}: decay must be one of {DECAY_FORMS}")
        if len(self.kernel_slots) > KERNEL_SLOTS or len(self.state) > STATE_SLOTS \
                or len(self.scalars) > SCALAR_SLOTS:
            raise ValueError(f"{self.name}: more than {KERNEL_SLOTS} kernel hyperparameters, "
                             f"{STATE_SLOTS} state buffers or {SCALAR_SLOTS} scalars")
        if any(s.sign not in INT8_EXPONENT_BITS for s in self.state):
            raise ValueError(f"{self.name}: a state's sign is one of {tuple(INT8_EXPONENT_BITS)}")
        if any(s.layout not in STATE_LAYOUTS for s in self.state) or (
                self.factored is not None) != any(s.layout != "elements" for s in self.state):
            raise ValueError(f"{self.name}: state layouts are {STATE_LAYOUTS}; the factored "
                             "ones belong to a definition with factored moments")
        if self.factored is not None:
            if self.reduce is not None or self.segment is None or self.decay != "own":
                raise ValueError(f"{self.name}: a factored definition has a segment function, "
                                 "no reduce, and applies its decay itself (decay 'own')")
        elif (self.reduce is None) != (not self.reductions and self.matrix is None) \
                or (self.reduce is None) != (self.segment is None):
            raise ValueError(f"{self.name}: a segmented definition has reduce and segment, and "
                             "reductions or a matrix stage; an elementwise one none of them")
        if self.segmented and (self.decay != "own" or len(self.reductions) > REDUCTION_SLOTS
                               or self.scalars or self.modes is not None):
            raise ValueError(f"{self.name}: a segmented definition applies its decay itself "
                             f"(decay 'own'), has at most {REDUCTION_SLOTS} reductions, and "
                             "no per-step scalars or modes")

    @property
    def segmented(self) -> bool:
        """Whether the kernels work per tensor over a segment table (LAMB, Muon, Adafactor)."""
        return self.reduce is not None or self.factored is not None

    def state_size(self, name: str, n: int, segments) -> int:
        """How many values state buffer ``name`` holds for params of ``n`` elements laid out
        as ``segments`` (a SegmentTable; None for an elementwise definition)."""
        layout = next(s.layout for s in self.state if s.name == name)
        if layout == "elements":
            return n
        return segments.factored_layout()[1][STATE_LAYOUTS.index(layout) - 1]

    @property
    def multi_launch(self) -> bool:
        """Whether the CUDA kernels have multi-tensor entry points (MULTI_SIGNATURE): the
        elementwise definitions without per-step scalars (a launch's last block writes
        those, for one tensor)."""
        return not self.segmented and not self.scalars

    @property
    def int8_refusal(self) -> str | None:
        """Why this definition cannot keep int8 state (None: it can): the tensor-aware ones
        keep per-tensor state layouts and passes the int8 blocks are not built for yet, and
        a buffer of param values (Schedule-Free's z) does not survive 8 bits."""
        name = self.classes[0].name
        if self.segmented:
            return (f"{name} updates each tensor as a whole; int8 state is built for the "
                    "elementwise optimizers only: use state_dtype='float32' or 'bfloat16'")
        held = [s.name for s in self.state if not s.quantizable]
        if held:
            return (f"{name}'s state {held} holds param values, which 8 bits cannot carry: "
                    "use state_dtype='float32' or 'bfloat16'")
        return None

    @functools.cached_property
    def kernel_slots(self) -> tuple[str, ...]:
        """The kernel's hyperparameter names in slot order (h0, h1, ...)."""
        return tuple(s for h in self.hypers for s in h.slots)

    @functools.cached_property
    def format_eps_slots(self) -> tuple[str, ...]:
        """The kernel slots where FORMAT_EPS means the format's machine epsilon."""
        return tuple(h.slots[0] for h in self.hypers if h.format_eps)

    @functools.cached_property
    def flag_slots(self) -> frozenset[str]:
        return frozenset(s for h in self.hypers if h.flag for s in h.slots)

    @functools.cached_property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.state)

    @functools.cached_property
    def hyper_defaults(self) -> dict:
        """Each hyperparameter's (torch's) default, by name."""
        return {h.name: h.default for h in self.hypers}

    def check_schedule(self, schedule):
        """The schedule, or a ValueError where this optimizer takes only a constant lr."""
        if not self.schedulable and not schedule.is_constant:
            raise ValueError(
                f"{self.classes[0].name} takes a constant lr, not a schedule: the lr only sets "
                "a param's initial step size, at its first step (as in torch, where a later lr "
                "reaches only params that start later); set group['lr'] for such params "
                f"instead; got {schedule!r}")
        return schedule

    def hyper(self, name: str) -> Hyper:
        return next(h for h in self.hypers if h.name == name)

    def check(self, values: dict, construction: bool = True) -> dict:
        """Every hyperparameter checked (torch's messages), in declaration order; the check
        across them (``validate``) too, unless torch makes it only at construction and this
        is not one (``validate_at_construction_only``)."""
        out = {h.name: _flag(h.name, values[h.name]) if h.check is bool
               else h.check(values[h.name]) for h in self.hypers}
        if self.validate is not None and (construction
                                          or not self.validate_at_construction_only):
            self.validate(out)
        return out

    @functools.cached_property
    def _slotted(self) -> tuple[Hyper, ...]:
        return tuple(h for h in self.hypers if h.slots)

    @functools.cached_property
    def _conditional(self) -> bool:
        return any(s.when is not None for s in self.state)

    def slot_values(self, hypers: dict) -> tuple[float, ...]:
        """The kernel's h0..h7 from checked hyperparameters (flags as 0.0/1.0, unused 0.0)."""
        values = []
        for h in self._slotted:
            value = hypers[h.name]
            if h.format_eps and value[0] is None:
                value = (FORMAT_EPS, *value[1:])
            if h.to_kernel is not None:
                value = h.to_kernel(value)
            if len(h.slots) > 1:
                values.extend(map(float, value))
            else:
                values.append(float(value))
        return (*values, *(0.0,) * (KERNEL_SLOTS - len(values)))

    def active_state(self, hypers: dict) -> tuple[str, ...]:
        """The state buffers these hyperparameters need, in kernel order."""
        if not self._conditional:
            return self.state_names
        slots = self.slot_values(hypers)
        return tuple(s.name for s, when in zip(self.state, self._when, strict=True)
                     if when is None or when(*slots))

    @functools.cached_property
    def _when(self) -> tuple:
        """Each state's ``when`` condition as a function of the kernel's slots (None: always);
        made once, as it runs on every functional call."""
        args = ", ".join((*self.kernel_slots, *(f"_h{i}" for i in range(
            len(self.kernel_slots), KERNEL_SLOTS))))
        return tuple(None if s.when is None else eval(  # noqa: S307  (the definition's text)
            f"lambda {args}: bool({s.when})", {"__builtins__": {"bool": bool}})
            for s in self.state)

    def initial_value(self, state: str, hypers: dict) -> float:
        init = next(s.init for s in self.state if s.name == state)
        if init in (FIRST_GRAD, INIT_LR, INIT_PARAMS):  # set by the kernel or the class
            return 0.0
        return float(hypers[init]) if isinstance(init, str) else float(init)

    @functools.cached_property
    def scalar_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.scalars)

    @functools.cached_property
    def always_kept_state(self) -> tuple[str, ...]:
        """The state every param that has stepped keeps, whatever the options (no ``when``)."""
        return tuple(s.name for s in self.state if s.when is None)

    @functools.cached_property
    def first_grad_state(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.state if s.init == FIRST_GRAD)

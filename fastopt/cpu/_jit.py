"""The one set of Numba options every CPU kernel is compiled with."""

from functools import cache

from numba import njit
from numba.core.compiler import Compiler
from numba.core.compiler_machinery import register_pass
from numba.core.typed_passes import ParforPass, _reload_parfors
from numba.parfors.parfor import ParforPass as _parfor_transform

#: LLVM's function attribute that sets the vector width its loop vectoriser aims for on this
#: function. LLVM tunes Intel's AVX-512 CPUs (skylake-avx512 and later) to prefer 256-bit
#: vectors for all code; fastopt's compute-bound kernels (int8 state, master-free 16-bit
#: params) ran 1.3-1.5x faster with 512-bit ones on such a host (bench/NOTES.md, nineteenth and
#: twentieth sessions). Where the CPU has no 512-bit vectors, or LLVM already prefers them
#: (AMD znver4/5), it changes nothing.
PREFER_512_BIT = '"prefer-vector-width"="512"'


@cache
def _wide_vector_context(base: type) -> type:
    """A subclass of Numba's target context class ``base`` that marks every function it lowers
    (the kernel, its parfor bodies, the internal functions lowered for them) with
    PREFER_512_BIT. fastopt's ``scalar`` functions (called by the kernels, not inlined into
    them by Numba) compile with it too; numpy's overloads, typed at typing time, without.
    """

    class WideVectorContext(base):
        def post_lowering(self, mod, library):
            for function in mod.functions:
                if not function.is_declaration:
                    # llvmlite accepts only its list of enum attributes through add();
                    # the set's own add() writes the string attribute into the IR as is.
                    set.add(function.attributes, PREFER_512_BIT)
            super().post_lowering(mod, library)

    WideVectorContext.__name__ = WideVectorContext.__qualname__ = "WideVector" + base.__name__
    return WideVectorContext


class WideVectorCompiler(Compiler):
    """Numba's default pipeline, compiling with a target context that asks LLVM for 512-bit
    vectors. The context is this compilation's own copy (``_make_subtarget``), and the parfor
    bodies' compilations copy it in turn, so no other Numba function in the process changes.
    The choice is not part of Numba's cache key: every fastopt kernel is always compiled this
    way, so a cached kernel is always a 512-bit-preferring one."""

    def __init__(self, typingctx, targetctx, library, args, return_type, flags, locals):
        super().__init__(typingctx, targetctx, library, args, return_type, flags, locals)
        context = self.state.targetctx
        if not type(context).__name__.startswith("WideVector"):
            context.__class__ = _wide_vector_context(type(context))
            # Numba's shallow copy shares the process's cache of internal functions (the
            # allocator call, reductions); a dict of the kernel's own keeps the attribute
            # out of that cache, and functions compiled for other code out of the kernel.
            context.cached_internal_func = {}


class KernelCompiler(WideVectorCompiler):
    """The kernels' pipeline: WideVectorCompiler, and the kernel's array arguments marked
    ``noalias`` for LLVM, as Numba marks the parfor bodies it compiles (the prange loops).

    Without it, LLVM vectorised a kernel's serial loop (``parallel=False``) only behind a
    run-time check that no buffer the loop writes overlaps another it reads or writes. The
    engine passes one real buffer for the state slots a step leaves unused (Adam's
    ``max_exp_avg_sq`` without amsgrad): the check then always failed and the scalar copy of
    the loop ran, 13 ns an element instead of ~1 with 16-bit params or state (bench/NOTES.md,
    twenty-first session). The assertion holds for every call fastopt makes: a kernel never
    accesses a slot it was given a stand-in for (nor the params passed as the master where
    there is none), the functional layer refuses arrays that overlap (``check_disjoint``,
    the per-step scalars included), and fastopt.torch copies a DTensor shard's gradient that
    overlaps its params or state and refuses a param moved onto its own buffers."""

    def __init__(self, typingctx, targetctx, library, args, return_type, flags, locals):
        flags = flags.copy()
        flags.noalias = True
        super().__init__(typingctx, targetctx, library, args, return_type, flags, locals)


# error_model="numpy": no division-by-zero checks in the loop, so LLVM can vectorise it.
# No fastmath at all, not even FMA contraction: LLVM contracted a * b + c differently in
# different loop shapes (the serial and the prange loop, the float32 and the 16-bit
# specialisations: 1 ulp apart, bench/NOTES.md 20), and the CUDA kernels (NVRTC --fmad=false)
# and their g++ host build (-ffp-contract=off) contract nothing either. NaN/inf propagate.
KERNEL_OPTIONS = dict(cache=True, parallel=True, nogil=True, error_model="numpy",
                      pipeline_class=KernelCompiler)
HELPER_OPTIONS = dict(cache=True, error_model="numpy", inline="always")


@register_pass(mutates_CFG=True, analysis_only=False)
class _ParforPassWithoutLoops(ParforPass):
    """Numba's ParforPass for a kernel's serial twin: the same transformation, without the
    warning that no loop became parallel (the twin has none by design). Its own pass, not a
    warnings filter: a filter changes the process-wide list, which another thread's
    ``catch_warnings`` could then keep, hiding the user's own warnings (found by a review)."""

    _name = "fastopt_parfor_pass_without_loops"

    def run_pass(self, state):
        _parfor_transform(state.func_ir, state.typemap, state.calltypes, state.return_type,
                          state.typingctx, state.targetctx, state.flags.auto_parallel,
                          state.flags, state.metadata, state.parfor_diagnostics).run()
        state.reload_init.append(_reload_parfors)  # (as ParforPass: the threads at a load)
        return True


class SerialKernelCompiler(KernelCompiler):
    """KernelCompiler for a kernel's serial twin (``<name>_serial``: the kernel's loops with
    ``range``, fastopt.codegen._numba_kernel), with ``_ParforPassWithoutLoops`` in place of
    Numba's ParforPass. The twin keeps parallel=True: compiled with parallel=False, Adam's
    serial loop took 273 µs over 1e4 elements instead of 6.4 (its int8 one 47.5 instead of
    13.6; bench/NOTES.md, twenty-fifth session)."""

    def define_pipelines(self):
        pipelines = super().define_pipelines()
        for pm in pipelines:
            pm.passes = [(_ParforPassWithoutLoops if p is ParforPass else p, d)
                         for p, d in pm.passes]
            pm.finalize()
        return pipelines


kernel = njit(**KERNEL_OPTIONS)
SERIAL_KERNEL_OPTIONS = {**KERNEL_OPTIONS, "pipeline_class": SerialKernelCompiler}
serial_kernel = njit(**SERIAL_KERNEL_OPTIONS)
helper = njit(**HELPER_OPTIONS)
# (functions called, not inlined, by the kernels: Adafactor's chunk passes hold loops)
scalar = njit(cache=True, error_model="numpy", pipeline_class=WideVectorCompiler)

"""Command line: ``fastopt bench`` and ``fastopt schedule``."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import os
import shlex
import sys
import tempfile
from decimal import Decimal

import numpy as np

from . import schedules
from .algorithms import CLASSES
from .algorithms._spec import MASTER_WEIGHTS, STATE_DTYPES


class UsageError(Exception):
    """A bad command line: ``main`` reports it as argparse reports its own errors (usage, then
    ``fastopt <command>: error: ...`` on stderr, exit status 2), before anything long runs."""


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


SCHEDULE_NAMES = ("constant", "linear", "linear_lr", "polynomial", "inverse_time", "exponential",
                  "step", "multistep", "ladder", "cosine", "cosine_restarts", "cyclic",
                  "one_cycle", "warmup", "join")


def parse_schedule(text: str) -> schedules.Schedule:
    """A schedule from an expression like ``warmup(cosine(1e-3, 10000), 500)``; no eval.
    Anything else raises ValueError (TypeError: wrong arguments to a schedule function)."""

    def build(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -build(node.operand)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [build(e) for e in node.elts]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in SCHEDULE_NAMES:
            fn = getattr(schedules, node.func.id)
            return fn(*[build(a) for a in node.args], **{k.arg: build(k.value)
                                                          for k in node.keywords})
        raise ValueError(f"not allowed in a schedule expression: {_short(ast.unparse(node))!r}")

    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        where = f" (column {exc.offset})" if exc.offset else ""
        raise ValueError(f"not an expression: {exc.msg}{where}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, nested too deeply
        raise ValueError(f"not an expression: {str(exc) or type(exc).__name__}") from None
    try:
        result = build(tree.body)
    except OverflowError as exc:  # e.g. a 400-digit integer where a float goes
        raise ValueError(f"a number is out of range ({exc})") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(result, schedules.Schedule):
        raise ValueError(f"{_short(text)!r} is not a schedule")
    return result


#: every public optimizer, AdamW first (the default)
ALL_OPTIMIZERS = sorted((name.lower() for name in CLASSES), key=lambda n: n != "adamw")
FULL_SIZES = [1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000]
#: ``fastopt schedule`` limits: steps are float64 in Schedule.at; the table stays printable
MAX_STEPS = 2**53
MAX_ROWS = 1_000_000
PLOT_POINTS = 20_000  # a plot of more steps samples this many, evenly spaced
#: the least a benchmark case allocates per parameter: params, grads, fastopt's copy and its
#: state (at least one buffer), the roofline's four buffers, all float32
MIN_BENCH_BYTES_PER_PARAM = 32


# ---------------------------------------------------------------------- argument types


def _whole_number(text: str) -> int:
    """An integer, also written as an integral float (``1e4``, ``1.6e7``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {_short(text)!r}") from None
    if not (math.isfinite(value) and value.is_integer()):
        raise argparse.ArgumentTypeError(f"not a whole number: {_short(text)!r}")
    return int(value)


def _positive_count(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {_short(text.strip())!r}")
    return value


def _steps(text: str) -> int:
    value = _positive_count(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be <= 2**53, got {_short(text.strip())!r}")
    return value


def _sizes(text: str) -> list[int]:
    """Comma-separated parameter counts, each >= 1; empty items are skipped."""
    return [_positive_count(x) for x in text.split(",") if x.strip()]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {_short(text)!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {_short(text)!r}")
    return value


# ---------------------------------------------------------------------- checks up front


def _check_output(option: str, path: str) -> None:
    """That ``path`` can be written (an existing file is left as it is)."""
    if not path:
        raise UsageError(f"{option}: empty path")
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise UsageError(f"{option} {path}: is a directory")
    folder = os.path.dirname(full)
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: no such directory {folder}")
    try:
        if os.path.exists(full):
            with open(full, "a"):
                pass
        else:
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None


def _check_plot(option: str, path: str) -> None:
    """matplotlib (not a dependency) is importable and writes this file type."""
    try:
        import matplotlib  # noqa: F401  (first: a submodule may be cached without its package)
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UsageError(f"{option} needs matplotlib, which is not installed "
                         "(pip install matplotlib)") from None
    suffix = os.path.splitext(path)[1][1:].lower()
    types = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in types:
        raise UsageError(f"{option} {path}: matplotlib cannot write .{suffix} files (it writes "
                         f"{', '.join(sorted(types))})")
    _check_output(option, path)


def _check_outputs(outputs: dict[str, str | None]) -> None:
    seen = {}
    for option, path in outputs.items():
        if path is None:
            continue
        if option == "--plot":
            _check_plot(option, path)
        else:
            _check_output(option, path)
        key = os.path.realpath(path)
        if key in seen:
            raise UsageError(f"{seen[key]} and {option} name the same file {path}")
        seen[key] = option


def _check_models(models: list[str]) -> list[int]:
    """Each shape list loads and holds positive dimensions; returns their parameter counts."""
    from .benchmark import load_shapes

    counts = []
    for model in models:
        try:
            _, shapes = load_shapes(model)
        except ValueError as exc:  # also bad JSON and bad text encoding
            raise UsageError(f"--models {model}: {exc}") from None
        except (OSError, KeyError, TypeError) as exc:
            raise UsageError(f"--models {model}: not a shape list like bench/shapes/*.json "
                             f"({type(exc).__name__}: {exc})") from None
        if not shapes or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                 for shape in shapes for d in shape):
            raise UsageError(f"--models {model}: every shape must be a list of integers >= 1")
        counts.append(sum(math.prod(shape) for shape in shapes))
    return counts


def _check_memory(params: int) -> None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on this platform
        return
    need = params * MIN_BENCH_BYTES_PER_PARAM
    if need > total:  # Decimal: params may be any integer, beyond float range
        raise UsageError(f"{Decimal(params):.3g} parameters need at least "
                         f"{Decimal(need) / 10**9:.3g} GB for one case; this machine has "
                         f"{total / 1e9:.3g} GB")


# ---------------------------------------------------------------------- commands


def cmd_bench(args) -> int:
    if args.full:
        sizes, models, optimizers = FULL_SIZES, ["gpt2_small", "resnet50"], ALL_OPTIMIZERS
    elif args.quick:
        sizes, models, optimizers = [1_000, 100_000, 1_000_000], ["resnet50"], ["adamw"]
    else:
        sizes, models, optimizers = [10_000, 1_000_000, 16_000_000], [], ["adamw"]
    sizes = args.sizes if args.sizes is not None else sizes
    models = args.models if args.models is not None else models
    optimizers = list(dict.fromkeys(args.optimizer)) if args.optimizer else optimizers
    budget = args.budget if args.budget else (0.1 if args.quick else 1.0)
    counts = sizes + _check_models(models)
    if counts:
        _check_memory(max(counts))
    _check_outputs({"--json": args.json, "--plot": args.plot, "--markdown": args.markdown})
    if args.markdown:  # its GPU section is kept: the existing page must read as text
        from .benchmark import kept_gpu_section

        try:
            kept_gpu_section(args.markdown)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--markdown {args.markdown}: cannot read the existing page "
                             f"({exc})") from None
    if not args.no_torch and counts and importlib.util.find_spec("torch") is None:
        raise UsageError("the comparison needs torch, which is not installed (pip install "
                         "'fastopt[bench]'); or pass --no-torch")

    if args.threads is not None:
        import numba

        most = numba.config.NUMBA_NUM_THREADS
        if args.threads > most:
            raise UsageError(f"--threads {args.threads}: at most {most} (Numba's thread pool, "
                             "NUMBA_NUM_THREADS; set it before starting for more)")
        numba.set_num_threads(args.threads)  # (torch follows: benchmark.run)

    from . import benchmark

    benchmark.torch_on_huge_pages()
    print(f"fastopt bench: {', '.join(optimizers)} at {sizes}"
          + (f" and {', '.join(models)}" if models else ""))
    command = "fastopt " + shlex.join(args.argv) if args.markdown else ""
    benchmark.run(optimizers, sizes, budget, args.json, args.plot, with_torch=not args.no_torch,
                  markdown_path=args.markdown, command=command, models=models,
                  progress=not args.no_progress,
                  state_dtypes=tuple(dict.fromkeys(
                      args.state_dtype + ["bfloat16"] * args.bf16_state)),
                  startup_repeats=(1 if args.quick else 3) if args.startup or args.full else 0,
                  master_weights=tuple(dict.fromkeys(args.master_weights)),
                  multi_tensor=args.multi_tensor)
    return 0


def cmd_schedule(args) -> int:
    try:
        sched = parse_schedule(args.expression)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"schedule {_short(args.expression)!r}: {exc}") from None
    rows = -(-args.steps // args.every)
    if rows > MAX_ROWS:
        raise UsageError(f"--steps {args.steps} --every {args.every} makes {rows:,} rows (at "
                         f"most {MAX_ROWS:,}): raise --every")
    if args.plot:
        _check_outputs({"--plot": args.plot})
    steps = np.arange(0, args.steps, min(args.every, args.steps), dtype=np.int64)
    lrs = sched.at(steps)
    print(f"{sched!r}")
    print(f"{'step':>10}  {'lr':>14}")
    for t, lr in zip(steps, lrs, strict=True):
        print(f"{t:>10d}  {lr:>14.6e}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = np.unique(np.linspace(0, args.steps - 1, min(args.steps, PLOT_POINTS)).round()
                      .astype(np.int64))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(t, sched.at(t))
        ax.set_xlabel("step (0-based: the k-th optimizer step uses step k - 1)")
        ax.set_ylabel("learning rate")
        ax.set_title(repr(sched), fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time fastopt vs torch.optim vs the memory roofline")
    bench.add_argument("--optimizer", nargs="+", choices=ALL_OPTIMIZERS, type=str.lower,
                       help="default: adamw (all with --full)")
    bench.add_argument("--sizes", type=_sizes,
                       help="comma-separated parameter counts, e.g. 1e4,1e6,1.6e7 "
                            "(default 1e4,1e6,1.6e7); '' for none")
    bench.add_argument("--models", nargs="*", help="shape lists: names in bench/shapes/ "
                                                   "(gpt2_small, resnet50) or JSON paths")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small cases, short runs (< 1 min)")
    mode.add_argument("--full", action="store_true",
                      help="all optimizers, 1e3..1e8 and the model shape lists")
    bench.add_argument("--budget", type=_seconds, help="seconds of timing per size (default 1)")
    bench.add_argument("--json", help="write the results as JSON here")
    bench.add_argument("--plot", help="write a PNG plot (GB/s vs size) here (needs matplotlib)")
    bench.add_argument("--markdown", help="write a results page (machine, date, table, plot)")
    bench.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--state-dtype", action="append", default=[],
                       choices=list(STATE_DTYPES),
                       help="also time fastopt with this optimizer-state format (repeatable; "
                            "int8 with its own same-traffic roofline)")
    bench.add_argument("--master-weights", action="append", default=[],
                       choices=list(MASTER_WEIGHTS),
                       help="also time fastopt over bfloat16 params keeping their float32 "
                            "values this way (repeatable; with float32 state and each "
                            "--state-dtype)")
    bench.add_argument("--multi-tensor", action="store_true",
                       help="also time fastopt.torch in its flat mode and its multi-tensor "
                            "mode (on the CPU a kernel call per tensor) over the case's "
                            "tensors")
    bench.add_argument("--threads", type=_positive_count,
                       help="threads for fastopt (Numba) and torch alike (default: Numba's, "
                            "NUMBA_NUM_THREADS, the cores; at most that)")
    bench.add_argument("--bf16-state", action="store_true",
                       help="the same as --state-dtype bfloat16")
    bench.add_argument("--startup", action="store_true",
                       help="also measure start-up in fresh processes: import, first step with "
                            "a cold and a warm Numba cache (always on with --full)")
    bench.set_defaults(func=cmd_bench)

    sched = sub.add_parser("schedule", help="print (and plot) a schedule's learning rates")
    sched.add_argument("expression", help="e.g. 'warmup(cosine(1e-3, 10000), 500)'")
    sched.add_argument("--steps", type=_steps, default=1000, help="steps 0..STEPS-1 (1000)")
    sched.add_argument("--every", type=_positive_count, default=100,
                       help="print every EVERY-th step (100)")
    sched.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    sched.set_defaults(func=cmd_schedule)

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except UsageError as exc:
        {"bench": bench, "schedule": sched}[args.command].error(str(exc))
    except KeyboardInterrupt:
        print("fastopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): stop without a traceback
        try:  # and keep the interpreter's final flush from failing on the closed pipe again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())

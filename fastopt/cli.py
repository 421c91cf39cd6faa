"""Command line: ``fastopt bench`` and ``fastopt schedule``."""

from __future__ import annotations

import argparse
import ast
import shlex
import sys

import numpy as np

from . import schedules

SCHEDULE_NAMES = ("constant", "linear", "linear_lr", "polynomial", "inverse_time", "exponential",
                  "step", "multistep", "ladder", "cosine", "cosine_restarts", "cyclic",
                  "one_cycle", "warmup", "join")


def parse_schedule(text: str) -> schedules.Schedule:
    """A schedule from an expression like ``warmup(cosine(1e-3, 10000), 500)``; no eval."""

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
        raise ValueError(f"not allowed in a schedule expression: {ast.unparse(node)!r}")

    result = build(ast.parse(text, mode="eval").body)
    if not isinstance(result, schedules.Schedule):
        raise ValueError(f"{text!r} is not a schedule")
    return result


ALL_OPTIMIZERS = ["adamw", "adam", "adagrad", "adadelta"]
FULL_SIZES = [1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000]


def _sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def cmd_bench(args) -> int:
    from . import benchmark

    if args.full:
        sizes, models, optimizers = FULL_SIZES, ["gpt2_small", "resnet50"], ALL_OPTIMIZERS
    elif args.quick:
        sizes, models, optimizers = [1_000, 100_000, 1_000_000], ["resnet50"], ["adamw"]
    else:
        sizes, models, optimizers = [10_000, 1_000_000, 16_000_000], [], ["adamw"]
    sizes = _sizes(args.sizes) if args.sizes is not None else sizes
    models = args.models if args.models is not None else models
    optimizers = [o.lower() for o in args.optimizer] if args.optimizer else optimizers
    budget = args.budget if args.budget else (0.1 if args.quick else 1.0)
    print(f"fastopt bench: {', '.join(optimizers)} at {sizes}"
          + (f" and {', '.join(models)}" if models else ""))
    command = "fastopt " + shlex.join(sys.argv[1:]) if args.markdown else ""
    benchmark.run(optimizers, sizes, budget, args.json, args.plot, with_torch=not args.no_torch,
                  markdown_path=args.markdown, command=command, models=models,
                  progress=not args.no_progress, bf16_state=args.bf16_state,
                  startup_repeats=(1 if args.quick else 3) if args.startup or args.full else 0)
    return 0


def cmd_schedule(args) -> int:
    sched = parse_schedule(args.expression)
    steps = np.arange(0, args.steps, args.every)
    lrs = sched.at(steps)
    print(f"{sched!r}")
    print(f"{'step':>10}  {'lr':>14}")
    for t, lr in zip(steps, lrs, strict=True):
        print(f"{t:>10d}  {lr:>14.6e}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = np.arange(args.steps)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(t, sched.at(t))
        ax.set_xlabel("step (0-based: the k-th optimizer step uses step k - 1)")
        ax.set_ylabel("learning rate")
        ax.set_title(repr(sched), fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time fastopt vs torch.optim vs the memory roofline")
    bench.add_argument("--optimizer", nargs="+", choices=ALL_OPTIMIZERS,
                       help="default: adamw (all four with --full)")
    bench.add_argument("--sizes", help="comma-separated parameter counts, e.g. 1e4,1e6,1.6e7 "
                                       "(default 1e4,1e6,1.6e7); '' for none")
    bench.add_argument("--models", nargs="*", help="shape lists: names in bench/shapes/ "
                                                   "(gpt2_small, resnet50) or JSON paths")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small cases, short runs (< 1 min)")
    mode.add_argument("--full", action="store_true",
                      help="all optimizers, 1e3..1e8 and the model shape lists")
    bench.add_argument("--budget", type=float, help="seconds of timing per size (default 1)")
    bench.add_argument("--json", help="write the results as JSON here")
    bench.add_argument("--plot", help="write a PNG plot (GB/s vs size) here")
    bench.add_argument("--markdown", help="write a results page (machine, date, table, plot)")
    bench.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--bf16-state", action="store_true",
                       help="also time fastopt with bfloat16 optimizer state")
    bench.add_argument("--startup", action="store_true",
                       help="also measure start-up in fresh processes: import, first step with "
                            "a cold and a warm Numba cache (always on with --full)")
    bench.set_defaults(func=cmd_bench)

    sched = sub.add_parser("schedule", help="print (and plot) a schedule's learning rates")
    sched.add_argument("expression", help="e.g. 'warmup(cosine(1e-3, 10000), 500)'")
    sched.add_argument("--steps", type=int, default=1000)
    sched.add_argument("--every", type=int, default=100)
    sched.add_argument("--plot", help="write a PNG plot here")
    sched.set_defaults(func=cmd_schedule)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"fastopt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

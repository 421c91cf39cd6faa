"""The host side of fastopt.torch.CPUOffload on this CPU, without a GPU: GPT-2 small's 148
param shapes as CPU "device" tensors with copies that run at once, timed against
fastopt.torch.AdamW stepping the same params in its flat buffer, and against that step plus
the copies CPUOffload makes (gradients down, params up: the same-traffic baseline).

    python bench/probes/offload_cpu.py [--rounds 5] [--bucket-elements 4194304]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload_gpt2 import GPT2  # noqa: E402

import fastopt.torch as fot  # noqa: E402


class AtOnce:
    """Transfers whose copies run when issued (CPU "device" tensors: nothing to overlap)."""

    def pinned(self):
        return False

    def after_current(self, stream):
        pass

    def copy(self, stream, dst, src):
        dst.copy_(src)

    def record(self, stream):
        return None

    def synchronize(self, event):
        pass

    def current_waits(self, event):
        pass

    d2h = h2d = None


def best(fn, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bucket-elements", type=int, default=1 << 22)
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = [p.shape for p in GPT2().parameters()]
    results = {}
    for kind in ("flat", "offload", "flat+copies"):
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        if kind == "offload":
            opt = fot.CPUOffload(params, "AdamW", lr=1e-4, _transfers=AtOnce(),
                                 bucket_elements=args.bucket_elements)

            def step(opt=opt):
                opt.step()
        else:
            opt = fot.AdamW(params, lr=1e-4)
            host_grads = [torch.empty_like(p) for p in params]
            device = [torch.empty_like(p) for p in params]

            def step(opt=opt, params=params, host_grads=host_grads, device=device,
                     copies=kind == "flat+copies"):
                if copies:  # (the gradients down, as CPUOffload copies them)
                    for p, h in zip(params, host_grads, strict=True):
                        h.copy_(p.grad)
                opt.step()
                if copies:  # (the params up: into a "device" copy of each)
                    with torch.no_grad():
                        for p, d in zip(params, device, strict=True):
                            d.copy_(p)
        step()  # (compiles, warms)
        results[kind] = best(step, args.rounds)
        print(f"{kind:>12}: {results[kind]:.1f} ms", flush=True)
    print(f"offload / flat {results['offload'] / results['flat']:.2f}x, "
          f"offload / (flat + copies) {results['offload'] / results['flat+copies']:.2f}x "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

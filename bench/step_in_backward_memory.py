"""Peak memory of a training step with and without fastopt.torch.step_in_backward.

    python bench/step_in_backward_memory.py [--layers 6] [--width 2048] [--steps 3] [--cuda]

Each mode runs in a fresh process (so the peaks do not mix): an MLP of ``layers`` square
Linear layers, AdamW with a warm-up + cosine schedule, one step, then ``steps`` steps of batch
8 measured. CPU: the largest resident set sampled every 0.5 ms during those steps (glibc's
mmap threshold fixed so that freed blocks leave the RSS; the process's lifetime peak would
count the optimizer's construction); CUDA (``--cuda``): ``torch.cuda.max_memory_allocated``
after a reset.
Prints both peaks, their difference, and the size of the model's gradients for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, threading, time, torch
import fastopt.torch as fot
from fastopt import schedules as S
layers, width, steps, mode, device = json.loads(sys.argv[1])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
opt = fot.AdamW(model.parameters(), lr=S.warmup(S.cosine(1e-3, 100), 10))
if mode == "in_backward":
    fot.step_in_backward(model, opt)
x = torch.randn(8, width, device=device)
page = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

def train(n):
    for _ in range(n):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if mode == "plain":
            opt.step()

train(1)  # the first step allocates the state; the peak is measured after it
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
base, peak, running = rss(), [0], [True]

def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)

watcher = threading.Thread(target=sample)
watcher.start()
train(steps)
running[0] = False
watcher.join()
peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak[0]
grads = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak": peak, "grads": grads}))
"""


def measure(layers: int, width: int, steps: int, mode: str, device: str) -> dict:
    # glibc's malloc raises its mmap threshold after the first large free, then keeps freed
    # gradients in the heap, where the peak RSS still counts them: a fixed threshold keeps
    # large blocks mmapped, so the RSS follows what is alive
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", CHILD,
                           json.dumps([layers, width, steps, mode, device])],
                          capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"
    plain = measure(args.layers, args.width, args.steps, "plain", device)
    inside = measure(args.layers, args.width, args.steps, "in_backward", device)
    what = "max_memory_allocated" if args.cuda else "peak RSS while training"
    mib = 1 << 20
    print(f"{device}: {args.layers} x Linear({args.width}, {args.width}), "
          f"gradients {plain['grads'] / mib:.0f} MiB")
    print(f"  backward(); step():      {what} {plain['peak'] / mib:.0f} MiB")
    print(f"  step_in_backward:        {what} {inside['peak'] / mib:.0f} MiB")
    print(f"  saved: {(plain['peak'] - inside['peak']) / mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

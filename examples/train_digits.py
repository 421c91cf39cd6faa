"""Train a small MLP on scikit-learn's bundled digits with fastopt and with torch.optim, side by
side: fot.AdamW + in-kernel warmup-cosine vs torch.optim.AdamW + SequentialLR(LinearLR,
CosineAnnealingLR). Prints accuracy and step time for both; saves both loss curves as a PNG
(they should overlap).

    python examples/train_digits.py [--epochs 30] [--plot digits.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.optim import lr_scheduler as L

import fastopt.torch as fot
from fastopt import schedules as S


def model_factory(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def run(epochs: int = 30, batch: int = 64, lr: float = 3e-3, warmup: int = 50,
        plot: str | None = None, out=print) -> dict:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    x_train, x_test = torch.from_numpy(x_train), torch.from_numpy(x_test)
    y_train, y_test = torch.from_numpy(y_train), torch.from_numpy(y_test)
    steps_per_epoch = -(-len(x_train) // batch)
    total = epochs * steps_per_epoch

    def make_fastopt(model):
        sched = S.warmup(S.cosine(lr, total - warmup), warmup, start_lr=lr * 0.01)
        return fot.AdamW(model.parameters(), lr=sched, weight_decay=0.05), None

    def make_torch(model):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        sched = L.SequentialLR(opt, [L.LinearLR(opt, 0.01, 1.0, warmup),
                                     L.CosineAnnealingLR(opt, total - warmup)], [warmup])
        return opt, sched

    results = {}
    for name, make in (("fastopt", make_fastopt), ("torch", make_torch)):
        model = model_factory()
        opt, sched = make(model)
        order = torch.Generator().manual_seed(1)
        losses, step_times = [], []
        for _ in range(epochs):
            perm = torch.randperm(len(x_train), generator=order)
            for i in range(0, len(x_train), batch):
                idx = perm[i:i + batch]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                t0 = time.perf_counter()
                opt.step()
                if sched is not None:
                    sched.step()
                step_times.append(time.perf_counter() - t0)
                losses.append(loss.item())
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        results[name] = {"losses": losses, "accuracy": acc,
                         "step_us": float(np.median(step_times)) * 1e6}
        out(f"{name:8s} test accuracy {acc:.4f}  median optimizer step "
            f"{results[name]['step_us']:.1f} us (incl. scheduler)")
    gap = max(abs(a - b) for a, b in zip(results["fastopt"]["losses"],
                                         results["torch"]["losses"], strict=True))
    out(f"largest loss difference between the runs: {gap:.2e}")
    results["max_loss_gap"] = gap
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(results["torch"]["losses"], label="torch.optim.AdamW + SequentialLR", lw=3,
                alpha=0.5)
        ax.plot(results["fastopt"]["losses"], label="fastopt.torch.AdamW + in-kernel schedule",
                lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        out(f"wrote {plot}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--plot", default="digits_loss.png")
    args = parser.parse_args()
    run(args.epochs, plot=args.plot)

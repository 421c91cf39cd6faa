"""Train a small MLP on scikit-learn's bundled digits with a fastopt.torch optimizer and with
its counterpart (its torch.optim twin, or for Lion, AdEMAMix and AdamWScheduleFree the
package its users know), side by side: fastopt evaluates a warm-up + cosine schedule in its
kernel, the counterpart follows the same values through a torch LambdaLR. Prints accuracy,
final loss and step time for both; saves both loss curves as a PNG (they should overlap).

    python examples/train_digits.py [--optimizer AdamW] [--epochs 30] [--plot digits.png]

Every optimizer runs with an lr that suits this task (TASK_LR, else its default; or ``--lr``)
and the options ``fastopt bench`` uses (SGD with momentum 0.9). Rprop takes no schedule (its
lr only starts the step sizes): it runs at a constant lr. AdamWScheduleFree is put in train
mode before training and in eval mode before testing, as its users do.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fastopt.torch as fot
from fastopt import schedules as S
from fastopt.algorithms import CLASSES
from fastopt.oracles import counterpart, counterpart_name


def model_factory(seed: int = 0, bias: bool = True) -> torch.nn.Module:
    """The MLP; without biases for an optimizer of matrices only (Muon: in a real model
    fastopt.torch.muon_param_groups gives the rest to AdamW)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128, bias=bias), torch.nn.ReLU(),
                               torch.nn.Linear(128, 64, bias=bias), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10, bias=bias))


#: lrs that train this small MLP in a few epochs (the others run at their own default lr)
TASK_LR = {"Adam": 1e-2, "AdamW": 1e-2, "Adamax": 1e-2, "AdEMAMix": 5e-3, "ASGD": 0.3,
           "LAMB": 3e-2, "Lion": 3e-3, "Muon": 2e-2, "RAdam": 3e-2, "SGD": 0.1}


def settings(optimizer: str, total: int, warmup: int,
             lr: float | None = None) -> tuple[float, dict, S.Schedule]:
    """(lr, options, schedule) for ``optimizer``: the lr (default: TASK_LR's, else the
    optimizer's), the bench options, and a warm-up + cosine schedule (a constant lr where the
    optimizer takes none)."""
    d, spec = CLASSES[optimizer]
    lr = TASK_LR.get(optimizer, d.lr_default) if lr is None else lr
    options = dict(spec.bench)
    if optimizer == "AdamW":
        options.setdefault("weight_decay", 0.05)
    if not d.schedulable:
        return lr, options, S.constant(lr)
    return lr, options, S.warmup(S.cosine(lr, total - warmup), warmup, start_lr=lr * 0.01)


def run(epochs: int = 30, batch: int = 64, optimizer: str = "AdamW", lr: float | None = None,
        warmup: int = 50, plot: str | None = None, out=print,
        state_dtype: str = "float32") -> dict:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    x_train, x_test = torch.from_numpy(x_train), torch.from_numpy(x_test)
    y_train, y_test = torch.from_numpy(y_train), torch.from_numpy(y_test)
    steps_per_epoch = -(-len(x_train) // batch)
    total = epochs * steps_per_epoch
    warmup = min(warmup, total // 2)
    lr, options, schedule = settings(optimizer, total, warmup, lr)

    def make_fastopt(model):
        return getattr(fot, optimizer)(model.parameters(), lr=schedule, state_dtype=state_dtype,
                                       **options), None

    def make_reference(model):
        opt = counterpart(optimizer, model.parameters(), lr, **options)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: schedule.at(k) / lr)

    results = {"optimizer": optimizer, "counterpart": counterpart_name(optimizer)}
    matrices_only = CLASSES[optimizer][0].matrix is not None
    for name, make in (("fastopt", make_fastopt), ("reference", make_reference)):
        model = model_factory(bias=not matrices_only)
        opt, sched = make(model)
        modes = hasattr(opt, "train") and hasattr(opt, "eval")  # Schedule-Free
        if modes:
            opt.train()
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
        if modes:
            opt.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
            final = torch.nn.functional.cross_entropy(model(x_train), y_train).item()
        results[name] = {"losses": losses, "accuracy": acc, "final_loss": final,
                         "step_us": float(np.median(step_times)) * 1e6}
        label = f"fastopt.torch.{optimizer}" if name == "fastopt" else results["counterpart"]
        out(f"{label:28s} test accuracy {acc:.4f}  final training loss {final:.4f}  "
            f"median optimizer step {results[name]['step_us']:.1f} us (incl. scheduler)")
    gap = max(abs(a - b) for a, b in zip(results["fastopt"]["losses"],
                                         results["reference"]["losses"], strict=True))
    out(f"largest loss difference between the runs: {gap:.2e}")
    results["max_loss_gap"] = gap
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(results["reference"]["losses"], label=f"{results['counterpart']} + LambdaLR",
                lw=3, alpha=0.5)
        ax.plot(results["fastopt"]["losses"],
                label=f"fastopt.torch.{optimizer} + in-kernel schedule", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        out(f"wrote {plot}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", default="AdamW", choices=sorted(CLASSES))
    parser.add_argument("--lr", type=float, default=None, help="default: the optimizer's")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--plot", default="digits_loss.png")
    parser.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16",
                                                                      "int8"],
                        help="fastopt's optimizer-state format (the reference keeps float32)")
    args = parser.parse_args()
    run(args.epochs, optimizer=args.optimizer, lr=args.lr, plot=args.plot,
        state_dtype=args.state_dtype)

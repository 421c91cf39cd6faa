"""Writes tests/data/checkpoints_v1/: checkpoints saved by fastopt before the optimizer
definitions (commit af88372), with the params and state 5 steps later, so tests can check
that files written by that code load and resume identically. Run once with that code:
``git worktree add /tmp/old af88372``, then
``PYTHONPATH=/tmp/old python tests/data/make_checkpoints_v1.py``.
"""

from pathlib import Path

import ml_dtypes
import numpy as np

import fastopt
from fastopt import schedules as S

OUT = Path(__file__).parent / "checkpoints_v1"
N = 77
CASES = {
    "adam_amsgrad": (lambda p: fastopt.Adam(p, lr=S.warmup(S.cosine(1e-2, 20), 3),
                                            amsgrad=True, weight_decay=0.1), np.float32),
    "adamw_bf16state": (lambda p: fastopt.AdamW(p, lr=S.step(1e-2, 4), state_dtype="bfloat16"),
                        np.float32),
    "adagrad_fp16": (lambda p: fastopt.Adagrad(p, lr=0.05, lr_decay=0.01,
                                               initial_accumulator_value=0.1), np.float16),
    "adadelta_bf16": (lambda p: fastopt.Adadelta(p, lr=S.cyclic(0.1, 1.0, 3), weight_decay=0.01,
                                                 maximize=True), ml_dtypes.bfloat16),
}


def grads(k: int) -> np.ndarray:
    return np.random.default_rng(k).standard_normal(N).astype(np.float32)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, (make, dtype) in CASES.items():
        p = np.random.default_rng(99).standard_normal(N).astype(dtype)
        opt = make(p)
        for k in range(1, 4):
            opt.step(grads(k))
        opt.lr_scale = 0.5
        fastopt.save(opt, OUT / f"{name}.npz")
        for k in range(4, 9):
            opt.step(grads(k))
        after = {f"state_{key}": value for key, value in opt.state_dict().items()
                 if isinstance(value, np.ndarray) and key != "schedule"}
        np.savez(OUT / f"{name}_after5.npz", params=p.view(np.uint16) if p.dtype != np.float32
                 else p, **after)


if __name__ == "__main__":
    main()

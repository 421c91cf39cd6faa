"""A small character-level transformer trained with AdamW in every optimizer-state format
fastopt has (float32, bfloat16, int8) and, where they import, the 8-bit AdamW of
bitsandbytes and torchao and torch's own AdamW: the same model, data, batches and warm-up +
cosine schedule for all. Prints each run's final training loss (the mean of its last 20
steps), validation loss, optimizer-state bytes per parameter and step time (the optimizer's
step alone, after 10 warm-up steps that compile).

    python examples/char_transformer.py [--steps 300] [--params bf16 --master-weights none]

The corpus is this repository's own text (README.md and bench/NOTES.md): nothing to download.
``--params bf16`` trains bfloat16 params (fastopt runs only), with ``--master-weights``
(fp32, remainder, none) choosing how they keep their float32 values.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import fastopt.torch as fot
from fastopt import schedules as S

ROOT = Path(__file__).resolve().parent.parent


def corpus() -> str:
    return "\n".join((ROOT / name).read_text() for name in ("README.md", "bench/NOTES.md"))


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CharModel(torch.nn.Module):
    def __init__(self, vocab: int, context: int, width: int = 128, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)
        self.register_buffer("mask", torch.triu(torch.full((context, context), float("-inf")),
                                                1))

    def forward(self, idx):
        x = self.embed(idx) + self.position[: idx.shape[1]]
        for block in self.blocks:
            x = block(x, self.mask[: idx.shape[1], : idx.shape[1]].to(x.dtype))
        return self.head(self.norm(x))


def make_optimizer(kind: str, params, lr: float, schedule, master_weights: str):
    """The AdamW of ``kind``: 'fastopt-<state dtype>', 'torch', 'bitsandbytes', 'torchao'."""
    if kind.startswith("fastopt-"):
        return fot.AdamW(params, lr=schedule, weight_decay=0.1,
                         state_dtype=kind.split("-", 1)[1], master_weights=master_weights)
    if kind == "torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    if kind == "bitsandbytes":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=0.1)
    if kind == "torchao":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=lr, weight_decay=0.1)
    raise ValueError(kind)


def state_bytes(opt) -> float:
    """Bytes of optimizer state (every tensor in opt.state but the step counts)."""
    total = 0
    for st in opt.state.values():
        for key, value in st.items():
            if key == "step" or not isinstance(value, torch.Tensor):
                continue
            inner = getattr(value, "__tensor_flatten__", None)  # (torchao's subclasses)
            if inner is not None:
                total += sum(getattr(value, n).numel() * getattr(value, n).element_size()
                             for n in inner()[0])
            else:
                total += value.numel() * value.element_size()
    return total


def train(kind: str, steps: int, lr: float, context: int = 64, batch: int = 32,
          dtype: torch.dtype = torch.float32, master_weights: str = "fp32",
          seed: int = 0) -> dict:
    text = corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    torch.manual_seed(seed)
    model = CharModel(len(chars), context).to(dtype)
    n = sum(p.numel() for p in model.parameters())
    schedule = S.warmup(S.cosine(lr, steps, end_lr=lr / 10), steps // 10)
    opt = make_optimizer(kind, model.parameters(), lr, schedule, master_weights)
    scheduler = None if kind.startswith("fastopt-") else torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: schedule.at(k) / lr)
    batches = torch.Generator().manual_seed(seed + 1)

    def sample(lo: int, hi: int):
        starts = torch.randint(lo, hi - context - 1, (batch,), generator=batches)
        x = torch.stack([data[s:s + context] for s in starts])
        y = torch.stack([data[s + 1:s + context + 1] for s in starts])
        return x, y

    losses, seconds, warm_up = [], 0.0, min(10, steps // 2)  # (compiles: not timed)
    for k in range(steps):
        x, y = sample(0, split)
        loss = torch.nn.functional.cross_entropy(model(x).float().reshape(-1, len(chars)),
                                                 y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        seconds += (time.perf_counter() - t0) * (k >= warm_up)
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    with torch.no_grad():
        val = sum(float(torch.nn.functional.cross_entropy(
            model(x).float().reshape(-1, len(chars)), y.reshape(-1)))
            for x, y in (sample(split, len(data)) for _ in range(20))) / 20
    return {"optimizer": kind, "params": n, "final loss": sum(losses[-20:]) / len(losses[-20:]),
            "val loss": val, "state B/param": state_bytes(opt) / n,
            "step ms": 1e3 * seconds / (steps - warm_up)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--params", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--master-weights", choices=["fp32", "remainder", "none"],
                        default="fp32")
    parser.add_argument("--only", nargs="*", help="run these kinds only")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.params == "bf16" else torch.float32
    kinds = ["fastopt-float32", "fastopt-bfloat16", "fastopt-int8"]
    if dtype == torch.float32:
        kinds = ["torch", *kinds, "bitsandbytes", "torchao"]
    if args.only:
        kinds = [k for k in kinds if k in args.only]
    rows = []
    for kind in kinds:
        try:
            rows.append(train(kind, args.steps, args.lr, dtype=dtype,
                              master_weights=args.master_weights))
        except Exception as exc:  # noqa: BLE001  (an oracle that does not run here)
            rows.append({"optimizer": kind, "error": f"{type(exc).__name__}: {exc}"[:160]})
        print(rows[-1], flush=True)
    print()
    print("| AdamW | final loss | val loss | state B/param | step ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['optimizer']} | {r['error']} | | | |")
        else:
            print(f"| {r['optimizer']} | {r['final loss']:.4f} | {r['val loss']:.4f} | "
                  f"{r['state B/param']:.2f} | {r['step ms']:.2f} |")
    assert all(math.isfinite(r.get("final loss", 0.0)) for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

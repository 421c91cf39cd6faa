"""CPU offload of the optimizer step on a GPT-2-small-sized model (issue "Past one device",
part 3): training step time (forward, backward, step) and peak GPU memory, in one run, for

- ``torch``: no offload, torch.optim.AdamW(fused=True);
- ``fastopt``: fastopt.torch.CPUOffload(..., "AdamW") (``--state-dtype`` for its state);
- ``fastopt-sib``: the same with ``step_in_backward=True`` (each bucket's CPU step overlaps
  the rest of backward);
- ``torchao``: torchao.optim.CPUOffloadOptimizer(params, torch.optim.AdamW, fused=True), if
  torchao imports;
- ``deepspeed``: DeepSpeedCPUAdam used the same way (pinned CPU master and state, grads copied
  down, params copied up), if deepspeed's CPU Adam builds.

The model: GPT-2 small's configuration (12 layers, 768 wide, 12 heads, vocabulary 50,257),
sequence 1,024, batch 8 (``--batch``), bfloat16 autocast, float32 params.

    python bench/offload_gpt2.py [--steps 6] [--batch 8] [--only fastopt,torch]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.nn as nn

VOCAB, WIDTH, LAYERS, HEADS, SEQ = 50257, 768, 12, 12, 1024


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc, self.out = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT2(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(SEQ, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(WIDTH)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.wte.weight.t()  # (tied head, as GPT-2)


def _deepspeed_step(params, lr):
    """DeepSpeedCPUAdam the way ZeRO-Offload uses it: float32 master and state in pinned CPU
    memory, the gradients copied down, the params copied up after the step."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    host = [torch.nn.Parameter(p.detach().to("cpu").pin_memory()) for p in params]
    opt = DeepSpeedCPUAdam(host, lr=lr, adamw_mode=True)

    def step():
        for p, h in zip(params, host, strict=True):
            h.grad = p.grad.to("cpu", non_blocking=True)
        torch.cuda.synchronize()
        opt.step()
        for p, h in zip(params, host, strict=True):
            p.data.copy_(h.data, non_blocking=True)

    return step


def make(kind: str, model: nn.Module, lr: float, state_dtype: str):
    params = list(model.parameters())
    if kind == "torch":
        opt = torch.optim.AdamW(params, lr=lr, fused=True)
        return opt.step, opt.zero_grad
    if kind in ("fastopt", "fastopt-sib"):
        import fastopt.torch as fot

        opt = fot.CPUOffload(params, "AdamW", lr=lr, state_dtype=state_dtype,
                             step_in_backward=kind == "fastopt-sib")
        return opt.step, opt.zero_grad
    if kind == "torchao":
        from torchao.optim import CPUOffloadOptimizer

        opt = CPUOffloadOptimizer(params, torch.optim.AdamW, lr=lr, fused=True)
        return opt.step, opt.zero_grad
    if kind == "deepspeed":
        step = _deepspeed_step(params, lr)
        return step, lambda: model.zero_grad(set_to_none=True)
    raise ValueError(kind)


def run(kind: str, steps: int, batch: int, state_dtype: str) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = GPT2().cuda()
    n = sum(p.numel() for p in model.parameters())
    try:
        step, zero_grad = make(kind, model, 3e-4, state_dtype)
    except Exception as e:  # (an optional library that does not run here)
        return {"kind": kind, "error": f"{type(e).__name__}: {e}"[:300]}
    idx = torch.randint(0, VOCAB, (batch, SEQ + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):  # (two warm-up steps)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().view(-1, VOCAB), idx[:, 1:].reshape(-1))
        loss.backward()
        step()
        zero_grad()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    result = {"kind": kind, "params": n, "batch": batch, "step_ms": 1e3 * min(times),
              "median_ms": 1e3 * sorted(times)[len(times) // 2],
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}
    del model, step, zero_grad
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--state-dtype", default="float32")
    ap.add_argument("--only", default="torch,fastopt,fastopt-sib,torchao,deepspeed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    results = []
    for kind in args.only.split(","):
        r = run(kind, args.steps, args.batch, args.state_dtype)
        results.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in results if r["kind"] == "torch" and "error" not in r), None)
    if base is not None:
        for r in results:
            if "error" not in r:
                ratio = r["step_ms"] / base["step_ms"]
                print(f"{r['kind']:>10}: step {r['step_ms']:.1f} ms ({ratio:.2f}x no offload), "
                      f"peak {r['peak_gib']:.2f} GiB "
                      f"({100 * (1 - r['peak_gib'] / base['peak_gib']):.0f} % lower)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

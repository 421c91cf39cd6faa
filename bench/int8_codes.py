"""Prototype for 8-bit blockwise optimizer state (issue "Fewer bytes", part 1: "measure before
building"): on this CPU, the cost per element of a fused Adam step whose two moments are
kept in 8 bits per element plus a float32 absmax per block, under three codes, and the
accuracy of each code on the moments of a real Adam run.

    python bench/int8_codes.py [--n 1.6e7] [--block 256]

Codes (a block's values divided by its absmax, so in [-1, 1]; one byte each):
- ``linear``: round(127 y); the baseline (bitsandbytes calls it "linear"; loses small values);
- ``dynamic``: a dynamic-exponent map in the manner of bitsandbytes' dynamic tree
  quantisation (a sign; an exponent, base 10, as the count of leading zero bits; the bits
  after the first one a linear fraction), 256 sorted values, encoded by a binary search
  for the nearest (our construction of the idea, not bitsandbytes' table);
- ``minifloat``: y as an 8-bit float with E exponent and M mantissa bits below 1 (E4M3 for
  the signed first moment; E5M3 or E4M4 for the unsigned second moment), code 0 = 0,
  encoded with integer operations on float32 bits: no table, no search.

Prints the step time per element next to the fp32-state kernel (same loop shape) and each
code's error on Adam's update direction m / (sqrt(v) + eps) after 200 steps of a run with
per-block gradient scales over eight orders of magnitude.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, prange

U32 = np.uint32


def dynamic_map(signed: bool) -> np.ndarray:
    """256 sorted values in [-1, 1] (signed) or [0, 1]: 0, and for exponent e = 0, 1, ...
    (scale 10^-e) 2^f linear steps of (0.1, 1] with f = 6 - e (signed; 7 - e unsigned)."""
    bits = 6 if signed else 7
    values = [0.0]
    for e in range(bits + 1):
        f = bits - e
        steps = 1 << f
        values += [10.0 ** -e * (0.1 + 0.9 * (i + 1) / steps) for i in range(steps)]
    pos = np.array(sorted(set(values)))
    table = np.concatenate([-pos[:0:-1], pos]) if signed else pos
    out = np.full(256, table[-1])  # (pad with the largest value: never chosen twice)
    out[: table.size] = table
    return np.sort(out).astype(np.float32)


@njit(inline="always")
def mf_encode(y, e_bits, m_bits):
    """|y| <= 1 as an (e_bits, m_bits) minifloat below 1: code 0 is 0, codes 1.. are
    2^(k - 2^e_bits + 1) (1 + m / 2^m_bits); rounds to nearest; the sign is the caller's."""
    u = np.float32(abs(y)).view(np.uint32)
    exponent = np.int32(u >> U32(23)) - np.int32(127)  # <= 0 for |y| <= 1
    lowest = -(np.int32(1) << np.int32(e_bits)) + np.int32(2)  # the smallest exponent kept
    shift = U32(23 - m_bits)
    mant = U32(U32(u & U32(0x7FFFFF)) + U32(U32(1) << U32(shift - U32(1)))) >> shift
    if mant == U32(1) << U32(m_bits):  # rounded up into the next binade
        mant = U32(0)
        exponent += np.int32(1)
    if exponent < lowest:
        return U32(0)
    if exponent > 0:
        exponent = np.int32(0)
        mant = U32((U32(1) << U32(m_bits)) - U32(1))
    return U32(U32(exponent - lowest + np.int32(1)) << U32(m_bits)) | mant


@njit(inline="always")
def mf_decode(code, e_bits, m_bits):
    if code == U32(0):
        return np.float32(0.0)
    lowest = -(1 << e_bits) + 2
    exponent = np.int32(code >> U32(m_bits)) - np.int32(1) + np.int32(lowest)
    mant = U32(code & U32((1 << m_bits) - 1))
    bits = U32(U32(exponent + np.int32(127)) << U32(23)) | U32(mant << U32(23 - m_bits))
    return bits.view(np.float32)


@njit(inline="always")
def nearest(table, y):
    lo, hi = 0, 255
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if table[mid] <= y:
            lo = mid
        else:
            hi = mid
    return lo if y - table[lo] <= table[hi] - y else hi


@njit(inline="always")
def encode(y, code, signed, table):
    """One byte for y in [-1, 1] under ``code`` (0 linear, 1 dynamic, 2 E4M3/E5M3, 3 E4M4)."""
    if code == 0:
        return U32(np.int32(np.round(y * np.float32(127.0))) + 128) if signed \
            else U32(np.round(y * np.float32(255.0)))
    if code == 1:
        return U32(nearest(table, y))
    if signed:
        c = mf_encode(y, 4, 3)
        return c | U32(128) if y < 0 else c
    return mf_encode(y, 5, 3) if code == 2 else mf_encode(y, 4, 4)


@njit(inline="always")
def decode(q, code, signed, table):
    if code == 0:
        return np.float32(np.int32(q) - 128) / np.float32(127.0) if signed \
            else np.float32(q) / np.float32(255.0)
    if code == 1:
        return table[q]
    if signed:
        v = mf_decode(q & U32(127), 4, 3)
        return -v if q & U32(128) else v
    return mf_decode(q, 5, 3) if code == 2 else mf_decode(q, 4, 4)


@njit(parallel=True, nogil=True)
def adam_int8(p, g, m_q, m_s, v_q, v_s, lr, b1, b2, eps, bc1, bc2, code, block, m_tab, v_tab):
    """One Adam step, each block whole: decode, update, new absmax, encode."""
    n_blocks = (p.size + block - 1) // block
    for b in prange(n_blocks):
        lo = b * block
        hi = min(lo + block, p.size)
        m = np.empty(block, np.float32)
        v = np.empty(block, np.float32)
        ms, vs = m_s[b], v_s[b]
        m_max = np.float32(0.0)
        v_max = np.float32(0.0)
        for i in range(lo, hi):
            mi = decode(U32(m_q[i]), code, True, m_tab) * ms
            vi = decode(U32(v_q[i]), code, False, v_tab) * vs
            gi = g[i]
            mi = mi + (np.float32(1.0) - b1) * (gi - mi)
            vi = b2 * vi + (np.float32(1.0) - b2) * gi * gi
            p[i] -= lr * (mi / bc1) / (np.sqrt(vi / bc2) + eps)
            m[i - lo] = mi
            v[i - lo] = vi
            m_max = max(m_max, abs(mi))
            v_max = max(v_max, vi)
        m_s[b], v_s[b] = m_max, v_max
        m_inv = np.float32(1.0) / m_max if m_max > 0 else np.float32(0.0)
        v_inv = np.float32(1.0) / v_max if v_max > 0 else np.float32(0.0)
        for i in range(lo, hi):
            m_q[i] = np.uint8(encode(m[i - lo] * m_inv, code, True, m_tab))
            v_q[i] = np.uint8(encode(v[i - lo] * v_inv, code, False, v_tab))


@njit(parallel=True, nogil=True)
def adam_fp32(p, g, m, v, lr, b1, b2, eps, bc1, bc2):
    for i in prange(p.size):
        gi = g[i]
        m[i] = m[i] + (np.float32(1.0) - b1) * (gi - m[i])
        v[i] = b2 * v[i] + (np.float32(1.0) - b2) * gi * gi
        p[i] -= lr * (m[i] / bc1) / (np.sqrt(v[i] / bc2) + eps)


@njit(parallel=True)
def roundtrip(x, signed, code, block, table):
    out = np.empty_like(x)
    for b in prange((x.size + block - 1) // block):
        lo, hi = b * block, min(b * block + block, x.size)
        scale = np.float32(0.0)
        for i in range(lo, hi):
            scale = max(scale, abs(x[i]))
        inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
        for i in range(lo, hi):
            out[i] = decode(encode(x[i] * inv, code, signed, table), code, signed, table) * scale
    return out


CODES = {0: "linear", 1: "dynamic (binary search)", 2: "minifloat E4M3 / E5M3",
         3: "minifloat E4M3 / E4M4"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=float, default=1.6e7)
    parser.add_argument("--block", type=int, default=256)
    args = parser.parse_args()
    n, block = int(args.n), args.block
    rng = np.random.default_rng(0)
    m_tab, v_tab = dynamic_map(True), dynamic_map(False)
    f = np.float32
    consts = (f(1e-3), f(0.9), f(0.999), f(1e-8), f(0.5), f(0.3))
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    adam_fp32(p, g, m, v, *consts)
    t = []
    for _ in range(7):
        t0 = time.perf_counter()
        adam_fp32(p, g, m, v, *consts)
        t.append(time.perf_counter() - t0)
    base = min(t)
    print(f"n = {n:.3g}, block {block}; times: best of 7 after a compiling call")
    print("| state | ms a step | ns / element | vs fp32 state |\n|---|---|---|---|")
    print(f"| fp32 | {base * 1e3:.2f} | {base / n * 1e9:.2f} | 1.00x |")
    blocks = (n + block - 1) // block
    for code, name in CODES.items():
        m_q, v_q = np.full(n, 128 if code == 0 else 0, np.uint8), np.zeros(n, np.uint8)
        m_s, v_s = np.zeros(blocks, np.float32), np.zeros(blocks, np.float32)
        adam_int8(p, g, m_q, m_s, v_q, v_s, *consts, code, block, m_tab, v_tab)
        t = []
        for _ in range(7):
            t0 = time.perf_counter()
            adam_int8(p, g, m_q, m_s, v_q, v_s, *consts, code, block, m_tab, v_tab)
            t.append(time.perf_counter() - t0)
        best = min(t)
        print(f"| int8 {name} | {best * 1e3:.2f} | {best / n * 1e9:.2f} | {base / best:.2f}x |")
    # accuracy: Adam's moments after 200 steps, gradients of per-block scales 1e-6 .. 1e2
    k = 1 << 18
    scale = np.repeat(10.0 ** rng.uniform(-6, 2, k // 64), 64).astype(np.float32)
    m, v = np.zeros(k, np.float32), np.zeros(k, np.float32)
    for _ in range(200):
        gk = (rng.standard_normal(k) * scale).astype(np.float32)
        m += 0.1 * (gk - m)
        v = 0.999 * v + 0.001 * gk * gk
    bc1, bc2 = 1 - 0.9 ** 200, 1 - 0.999 ** 200
    eps = 1e-8
    want = (m / bc1) / (np.sqrt(v / bc2) + eps)
    print("\nAdam's update direction after 200 steps from quantised m and v (2^18 elements, "
          f"blocks of {block}); relative error |got - want| / max(|want|, 1e-3):")
    print("| code | median | 99th pct | max | v to 0 where m is not |\n|---|---|---|---|---|")
    for code, name in CODES.items():
        mq = roundtrip(m, True, code, block, m_tab)
        vq = roundtrip(v, False, code, block, v_tab)
        got = (mq / bc1) / (np.sqrt(vq / bc2) + eps)
        err = np.abs(got - want) / np.maximum(np.abs(want), 1e-3)
        lost = np.mean((vq == 0) & (mq != 0))
        print(f"| {name} | {np.median(err):.2e} | {np.quantile(err, 0.99):.2e} | "
              f"{err.max():.2e} | {lost:.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

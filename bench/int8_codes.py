"""Prototype for 8-bit blockwise optimizer state (issue "Fewer bytes", part 1: "measure before
building"): on this CPU, the cost per element of a fused Adam step whose two moments are
kept in 8 bits per element plus a float32 absmax per block, under three codes, and the
accuracy of each code on the moments of a real Adam run.

    python bench/int8_codes.py [--n 1.6e7] [--blocks 128,256,2048]

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
from numba import get_num_threads, get_thread_id, njit, prange

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
    """|y| <= 1 as an (e_bits, m_bits) minifloat below 1: code 0 is 0, code c > 0 is
    2^(c >> m_bits - 2^e_bits + 1) (1 + (c & (2^m_bits - 1)) / 2^m_bits); rounds half up,
    underflow to 0; the sign is the caller's. Integer operations on the float's bits and
    one select: no branch, no table (the rounding carry runs into the exponent by itself)."""
    u = np.float32(abs(y)).view(np.uint32)
    shifted = np.int32(U32(u + U32(1 << (22 - m_bits))) >> U32(23 - m_bits))
    code = shifted - np.int32((127 - (1 << e_bits) + 1) << m_bits)
    return U32(code) if code >= np.int32(1 << m_bits) else U32(0)


@njit(inline="always")
def mf_decode(code, e_bits, m_bits):
    bits = U32(U32(code + U32((127 - (1 << e_bits) + 1) << m_bits)) << U32(23 - m_bits))
    return bits.view(np.float32) if code != U32(0) else np.float32(0.0)


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


@njit  # (not inlined: Numba's IR inliner clashes on the loop variable when inlined twice)
def lane_max(x, count):
    """max |x[:count]|, as the largest of the values' bits without the sign: for floats of
    one sign the bits order as the values do, so this is an integer max reduction, which
    LLVM vectorises (a float max with NaN semantics it does not); a NaN's bits exceed every
    number's, so a NaN comes out as the max, as it should."""
    top = np.uint32(0)
    for j in range(np.uint64(0), np.uint64(count)):
        bits = np.uint32(np.float32(x[j]).view(np.uint32) & np.uint32(0x7FFFFFFF))
        top = np.uint32(bits if bits > top else top)
    return np.uint32(top).view(np.float32)


def make_code(code: int):
    """(encode, decode) of one code for y in [-1, 1], signed (m) and unsigned (v), as
    functions compiled for that code alone (0 linear, 1 dynamic, 2 E4M3 / E5M3, 3 E4M3 /
    E4M4)."""
    if code == 0:
        @njit(inline="always")
        def enc_m(y, table):
            return U32(np.int32(np.round(y * np.float32(127.0))) + 128)

        @njit(inline="always")
        def dec_m(q, table):
            return np.float32(np.int32(q) - 128) / np.float32(127.0)

        @njit(inline="always")
        def enc_v(y, table):
            return U32(np.round(y * np.float32(255.0)))

        @njit(inline="always")
        def dec_v(q, table):
            return np.float32(q) / np.float32(255.0)
    elif code == 1:
        @njit(inline="always")
        def enc_m(y, table):
            return U32(nearest(table, y))

        @njit(inline="always")
        def dec_m(q, table):
            return table[q]

        enc_v, dec_v = enc_m, dec_m
    else:
        v_e, v_m = (5, 3) if code == 2 else (4, 4)

        @njit(inline="always")
        def enc_m(y, table):
            c = mf_encode(y, 4, 3)
            return c | U32(128) if y < 0 else c

        @njit(inline="always")
        def dec_m(q, table):
            v = mf_decode(q & U32(127), 4, 3)
            return -v if q & U32(128) else v

        @njit(inline="always")
        def enc_v(y, table):
            return mf_encode(y, v_e, v_m)

        @njit(inline="always")
        def dec_v(q, table):
            return mf_decode(q, v_e, v_m)
    return enc_m, dec_m, enc_v, dec_v


def make_adam_int8(code: int, fastmath: bool = False):
    """One Adam step with int8 m and v: each block whole (decode, update, new absmax into a
    per-thread scratch, encode). ``fastmath``: LLVM may reorder (vectorises the absmax)."""
    enc_m, dec_m, enc_v, dec_v = make_code(code)

    @njit(parallel=True, nogil=True, fastmath=fastmath)
    def adam_int8(p, g, m_q, m_s, v_q, v_s, lr, b1, b2, eps, bc1, bc2, block, m_tab, v_tab,
                  scratch):
        n_blocks = (p.size + block - 1) // block
        for b in prange(n_blocks):
            t = get_thread_id()
            # (unsigned bounds: a signed index's wrap-around check stops LLVM's vectoriser,
            # bench/NOTES.md "LAMB's passes vectorised")
            lo = np.uint64(b * block)
            hi = np.uint64(min(b * block + block, p.size))
            ms, vs = m_s[b], v_s[b]
            sm, sv = scratch[t, 0], scratch[t, 1]
            for i in range(lo, hi):  # (no reduction in this loop: it vectorises)
                mi = dec_m(U32(m_q[i]), m_tab) * ms
                vi = dec_v(U32(v_q[i]), v_tab) * vs
                gi = g[i]
                mi = mi + (np.float32(1.0) - b1) * (gi - mi)
                vi = b2 * vi + (np.float32(1.0) - b2) * gi * gi
                p[i] -= lr * (mi / bc1) / (np.sqrt(vi / bc2) + eps)
                sm[i - lo] = mi
                sv[i - lo] = vi
            m_max, v_max = lane_max(sm, np.int64(hi - lo)), lane_max(sv, np.int64(hi - lo))
            m_s[b], v_s[b] = m_max, v_max
            m_inv = np.float32(1.0) / m_max if m_max > 0 else np.float32(0.0)
            v_inv = np.float32(1.0) / v_max if v_max > 0 else np.float32(0.0)
            for i in range(lo, hi):
                m_q[i] = np.uint8(enc_m(sm[i - lo] * m_inv, m_tab))
                v_q[i] = np.uint8(enc_v(sv[i - lo] * v_inv, v_tab))

    @njit(parallel=True)
    def roundtrip(x, signed, block, table):
        out = np.empty_like(x)
        for b in prange((x.size + block - 1) // block):
            lo, hi = b * block, min(b * block + block, x.size)
            scale = np.float32(0.0)
            for i in range(lo, hi):
                scale = max(scale, abs(x[i]))
            inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
            for i in range(lo, hi):
                if signed:
                    out[i] = dec_m(enc_m(x[i] * inv, table), table) * scale
                else:
                    out[i] = dec_v(enc_v(x[i] * inv, table), table) * scale
        return out

    return adam_int8, roundtrip


@njit(parallel=True, nogil=True)
def adam_fp32(p, g, m, v, lr, b1, b2, eps, bc1, bc2):
    for i in prange(p.size):
        gi = g[i]
        m[i] = m[i] + (np.float32(1.0) - b1) * (gi - m[i])
        v[i] = b2 * v[i] + (np.float32(1.0) - b2) * gi * gi
        p[i] -= lr * (m[i] / bc1) / (np.sqrt(v[i] / bc2) + eps)


CODES = {0: "linear", 1: "dynamic (binary search)", 2: "minifloat E4M3 / E5M3",
         3: "minifloat E4M3 / E4M4"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=float, default=1.6e7)
    parser.add_argument("--blocks", default="128,256,2048")
    args = parser.parse_args()
    n = int(args.n)
    rng = np.random.default_rng(0)
    m_tab, v_tab = dynamic_map(True), dynamic_map(False)
    f = np.float32
    consts = (f(1e-3), f(0.9), f(0.999), f(1e-8), f(0.5), f(0.3))
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    base = best_of(lambda: adam_fp32(p, g, m, v, *consts))
    kernels = {code: make_adam_int8(code) for code in CODES}
    fast = {code: make_adam_int8(code, True)[0] for code in (0, 2)}
    print(f"n = {n:.3g}, {get_num_threads()} threads; best of 7 after a compiling call")
    print("| state | block | ms a step | ns / element | vs fp32 state |\n|---|---|---|---|---|")
    print(f"| fp32 | | {base * 1e3:.2f} | {base / n * 1e9:.2f} | 1.00x |")
    for block in map(int, args.blocks.split(",")):
        blocks = (n + block - 1) // block
        scratch = np.empty((get_num_threads(), 2, block), np.float32)
        for code, name in CODES.items():
            m_q, v_q = np.full(n, 128 if code == 0 else 0, np.uint8), np.zeros(n, np.uint8)
            m_s, v_s = np.zeros(blocks, np.float32), np.zeros(blocks, np.float32)
            step = kernels[code][0]
            args = (p, g, m_q, m_s, v_q, v_s, *consts, block, m_tab, v_tab, scratch)
            t = best_of(lambda step=step, args=args: step(*args))
            print(f"| int8 {name} | {block} | {t * 1e3:.2f} | {t / n * 1e9:.2f} | "
                  f"{base / t:.2f}x |")
            if code in fast:
                t = best_of(lambda step=fast[code], args=args: step(*args))
                print(f"| int8 {name}, fastmath | {block} | {t * 1e3:.2f} | "
                      f"{t / n * 1e9:.2f} | {base / t:.2f}x |")
    k = 1 << 18
    for label, group in (("gradient scales per 64 elements (8 decades inside a block)", 64),
                         ("gradient scales per 4096 elements (blocks of one scale)", 4096)):
        scale = np.repeat(10.0 ** rng.uniform(-6, 2, k // group), group).astype(np.float32)
        m, v = np.zeros(k, np.float32), np.zeros(k, np.float32)
        for _ in range(200):
            gk = (rng.standard_normal(k) * scale).astype(np.float32)
            m += 0.1 * (gk - m)
            v = 0.999 * v + 0.001 * gk * gk
        bc1, bc2 = 1 - 0.9 ** 200, 1 - 0.999 ** 200
        want = (m / bc1) / (np.sqrt(v / bc2) + 1e-8)
        print(f"\nAdam's update direction after 200 steps from quantised m and v, {label}; "
              "2^18 elements, blocks of 256; error |got - want| / max(|want|, 1e-3):")
        print("| code | median | 99th pct | max | v to 0 where m is not |\n|---|---|---|---|---|")
        for code, name in CODES.items():
            roundtrip = kernels[code][1]
            mq = roundtrip(m, True, 256, m_tab)
            vq = roundtrip(v, False, 256, v_tab)
            got = (mq / bc1) / (np.sqrt(vq / bc2) + 1e-8)
            err = np.abs(got - want) / np.maximum(np.abs(want), 1e-3)
            lost = np.mean((vq == 0) & (mq != 0))
            print(f"| {name} | {np.median(err):.2e} | {np.quantile(err, 0.99):.2e} | "
                  f"{err.max():.2e} | {lost:.2%} |")
    return 0


def best_of(fn, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


if __name__ == "__main__":
    raise SystemExit(main())

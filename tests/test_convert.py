"""16-bit <-> float32 conversions of the CPU kernels against numpy / ml_dtypes, every pattern."""

import numpy as np
import pytest
from numba import njit

from fastopt.cpu.convert import BF16, FP16, from_float, to_float

ml_dtypes = pytest.importorskip("ml_dtypes")
FORMATS = [(FP16, np.float16), (BF16, ml_dtypes.bfloat16)]


@njit(error_model="numpy")
def _to(bits, fmt, out):
    for i in range(bits.shape[0]):
        out[i] = to_float(bits[i], fmt)


@njit(error_model="numpy")
def _from(values, fmt, out):
    for i in range(values.shape[0]):
        out[i] = from_float(values[i], fmt)


@pytest.mark.parametrize("fmt,dtype", FORMATS)
def test_every_16_bit_pattern_to_float(fmt, dtype):
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(65536, np.float32)
    _to(bits, fmt, out)
    ref = bits.view(dtype).astype(np.float32)
    same = (out.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(out) & np.isnan(ref))
    assert same.all(), bits[~same][:10]


@pytest.mark.parametrize("fmt,dtype", FORMATS)
def test_float_to_16_bit_rounds_to_nearest_even(fmt, dtype):
    rng = np.random.default_rng(0)
    scale = np.float32(10.0) ** rng.integers(-12, 8, 300_000).astype(np.float32)
    exact = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(dtype).astype(np.float32)
    exact = exact[np.isfinite(exact)]
    ladder = np.unique(exact.astype(np.float64))
    ties = ((ladder[:-1] + ladder[1:]) / 2).astype(np.float32)  # exactly halfway: to even
    values = np.concatenate([
        ties,
        rng.standard_normal(300_000).astype(np.float32) * scale,
        exact,  # every finite 16-bit value, and its float32 neighbours
        np.nextafter(exact, np.float32(np.inf)), np.nextafter(exact, np.float32(-np.inf)),
        np.array([np.inf, -np.inf, 65504, 65520, 65519.99, 6e-8, 3e-8, 2.98e-8, 1e-45, 0.0,
                  -0.0, 3.4e38, -3.4e38], np.float32)]).astype(np.float32)
    out = np.empty(values.size, np.uint16)
    _from(values, fmt, out)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = values.astype(dtype).view(np.uint16)
    nan = np.isnan(values)
    assert np.array_equal(out[~nan], ref[~nan])
    assert np.isnan(out[nan].view(dtype).astype(np.float32)).all()


def test_the_format_is_a_compile_time_marker_not_a_number():
    """A format given as a number (the kernels' old ``fmt``, tested in the loop at run time)
    is refused when the kernel is typed."""
    from numba.core.errors import TypingError

    with pytest.raises(TypingError, match="format marker"):
        _to(np.zeros(2, np.uint16), BF16 == BF16, np.empty(2, np.float32))
    with pytest.raises(TypingError, match="format marker"):
        _from(np.zeros(2, np.float32), 1, np.empty(2, np.uint16))


def _hash_reference(i: int, seed: int) -> int:
    """random32's hash in Python integers (the CUDA kernels' random32 in kernels/common.cuh)."""
    m = 0xFFFFFFFF
    h = ((i & m) * 0x9E3779B1 + (seed & m)) & m
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & m
    return h ^ (h >> 12)


def test_random32_is_the_32_bit_hash_for_every_index_and_seed_type():
    from fastopt.cpu.convert import random32

    @njit
    def many(index, seeds):  # (in a loop, as the kernels call it: the vectorised form)
        out = np.empty(index.shape[0], np.uint32)
        for k in range(index.shape[0]):
            out[k] = random32(index[k], seeds[k])
        return out

    rng = np.random.default_rng(0)
    index = rng.integers(0, 2**63, 4096, dtype=np.int64)
    index[:4] = [0, 1, 2**32 - 1, 2**32]
    seeds = rng.integers(0, 2**32, 4096, dtype=np.uint64)
    expected = [_hash_reference(int(i), int(s)) for i, s in zip(index, seeds, strict=True)]
    for i_type, s_type in [(np.int64, np.uint32), (np.uint64, np.uint64), (np.int64, np.uint64),
                           (np.uint64, np.uint32)]:
        got = many(index.astype(i_type), seeds.astype(s_type))
        assert got.tolist() == expected, (i_type, s_type)
    assert random32(np.int64(index[5]), np.uint32(seeds[5])) == expected[5]  # (a scalar call)


def test_the_int8_encode_loops_carried_hash_gives_random32s_bits():
    """The int8 encode loops carry i * HASH_MULTIPLIER along (hash_index, next_hash_index)
    and take stochastic_bits_at: the bits of random32(i, seed ^ salt) & STEP_MASK, for
    blocks anywhere in a buffer, past 2^32 elements included."""
    from fastopt.cpu import int8

    @njit
    def carried(lo, count, seed, salt):  # (as the generated kernels' loop)
        out = np.empty(count, np.uint32)
        h = int8.hash_index(lo)
        for j in range(np.uint64(0), np.uint64(count)):
            out[j] = int8.stochastic_bits_at(h, seed, salt)
            h = int8.next_hash_index(h)
        return out

    for lo in (0, 256, 2**32 - 128, 2**33 + 512):
        for seed, salt in [(np.uint32(0), int8.SALTS[0]), (np.uint32(0xDEADBEEF), int8.SALTS[2])]:
            got = carried(np.uint64(lo), 256, seed, salt)
            want = [_hash_reference(lo + j, int(seed) ^ salt) & int8.STEP_MASK
                    for j in range(256)]
            assert got.tolist() == want, (lo, seed)

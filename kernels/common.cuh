// fastopt CUDA common header: qualifiers, typed load/store (fp32 math inside), vector access,
// and the device-resident step counter: the CUDA side of the driver that fastopt/codegen.py
// writes into every kernels/<name>.cu. Its CPU counterparts are fastopt/cpu/access.py and
// convert.py (16-bit and bf16 conversions, the random bits of the bf16 rounding); both are
// checked against each other by tests/test_cuda_host.py.
#pragma once

#include "signature.cuh"  // (the int8 code's constants)

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define FO_HD __host__ __device__ __forceinline__
#define FO_D __device__ __forceinline__
#else  // the g++ host build used by the tests (a shim defines the CUDA built-ins)
#include <math.h>
#include <string.h>
#define FO_HD inline
#define FO_D inline
#endif

// Bit casts between float and its 32 bits.
FO_HD unsigned float_bits(float f) {
#if defined(__CUDACC__)
    return __float_as_uint(f);
#else
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
#endif
}
FO_HD float bits_float(unsigned u) {
#if defined(__CUDACC__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

// The sign of x as the definitions' sign() (torch.sign): 1, -1, or 0 for +-0 and NaN.
FO_HD float fo_sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }
FO_HD double fo_sign(double x) { return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0); }

// bfloat16 optimizer state is stored as raw bits (mirrors fastopt/cpu/convert.py): read
// exactly, written with stochastic rounding (unbiased) from 16 random bits per buffer.
typedef unsigned short bf16_bits;

// 32 pseudo-random bits for element i and the step's seed (a multiply-xorshift hash).
FO_HD unsigned random32(long long i, unsigned seed) {
    unsigned h = (unsigned)i * 0x9E3779B1u + seed;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    return h ^ (h >> 12);
}

// The stochastic-rounding seed of step k.
FO_HD unsigned step_seed(unsigned long long step) {
    return (unsigned)(step * 0x9E3779B9ull);
}

FO_HD float bf16_to_float(bf16_bits h) { return bits_float((unsigned)h << 16); }

FO_HD bf16_bits float_to_bf16_stochastic(float f, unsigned rand16) {
    const unsigned u = float_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (bf16_bits)((u >> 16) | 0x40u);  // NaN
    return (bf16_bits)((u + rand16) >> 16);
}

// Elements per vector group: 4, one 16-byte access per float32 buffer (8 bytes for 16-bit
// params). Groups of 8 for 16-bit params (16-byte accesses to them, two to each float32
// buffer) ran at 81 % of a same-bytes copy on an H200, groups of 4 at 90 % (bench/NOTES.md 18).
template <typename T>
struct VecWidth {
    static constexpr int value = 4;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
    T v[N];
};

FO_HD float to_float(float x) { return x; }
FO_HD float from_float(float x, float*) { return x; }
FO_HD float to_float(bf16_bits x) { return bf16_to_float(x); }
#if defined(__CUDACC__)
FO_D float to_float(__half x) { return __half2float(x); }
FO_D __half from_float(float x, __half*) { return __float2half_rn(x); }
FO_D float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
FO_D __nv_bfloat16 from_float(float x, __nv_bfloat16*) { return __float2bfloat16_rn(x); }
#endif

// True when every pointer is aligned for N-element vector access of its own type.
template <int N, typename T>
FO_HD bool aligned_for(const T* p) {
    return reinterpret_cast<unsigned long long>(p) % (sizeof(T) * N) == 0;
}

// step_state[0]: steps taken; step_state[1]: blocks finished in the running launch.
// Every thread reads step_state[0] before it does anything else; the last block to finish
// advances it, so a launch never reads a half-updated counter and a whole step needs no host
// round trip (graph-capturable).
// Returns true in the one thread that advanced it (thread 0 of the last block): there a kernel
// stores its per-step scalars, which every block has read by then.
FO_D bool finish_step(unsigned long long* step_state, double* lr_out, double lr) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned long long done = atomicAdd(&step_state[1], 1ULL);
        if (done == gridDim.x - 1) {
            step_state[0] += 1;
            step_state[1] = 0;
            *lr_out = lr;
            __threadfence();
            return true;
        }
    }
    return false;
}

template <int N>
struct Width {
    static constexpr int value = N;
};

template <bool B>
struct Flag {
    static constexpr bool value = B;
};

// N consecutive elements of T (N > 1: one aligned vector access) into / out of fp32 registers.
template <int N, typename T>
FO_HD void load(const T* ptr, float (&out)[N]) {
    if constexpr (N == 1) {
        out[0] = to_float(*ptr);
    } else {
        const Vec<T, N> vec = *reinterpret_cast<const Vec<T, N>*>(ptr);
#pragma unroll
        for (int j = 0; j < N; ++j) out[j] = to_float(vec.v[j]);
    }
}

template <int N, typename T>
FO_HD void store(T* ptr, const float (&in)[N]) {
    if constexpr (N == 1) {
        *ptr = from_float(in[0], ptr);
    } else {
        Vec<T, N> vec;
#pragma unroll
        for (int j = 0; j < N; ++j) vec.v[j] = from_float(in[j], ptr);
        *reinterpret_cast<Vec<T, N>*>(ptr) = vec;
    }
}

// Params: float32 params are updated in place; 16-bit params come with a float32 master copy
// that the math reads and writes, and get the master rounded to nearest even in the same pass
// (mirrors fastopt/cpu/access.py).
template <typename T>
struct IsFloat {
    static constexpr bool value = false;
};
template <>
struct IsFloat<float> {
    static constexpr bool value = true;
};
template <typename T>
struct IsBf16 {
    static constexpr bool value = false;
};
#if defined(__CUDACC__)
template <>
struct IsBf16<__nv_bfloat16> {
    static constexpr bool value = true;
};
#else
// The host build's stand-in for __nv_bfloat16 params (the tests build the bf16 variants of
// the elementwise kernels with it): its bits, read exactly, written rounded to nearest even.
struct fo_host_bf16 {
    unsigned short bits;
};
FO_HD float to_float(fo_host_bf16 x) { return bf16_to_float(x.bits); }
FO_HD fo_host_bf16 from_float(float x, fo_host_bf16*) {
    const unsigned u = float_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {(unsigned short)((u >> 16) | 0x40u)};
    return {(unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}
template <>
struct IsBf16<fo_host_bf16> {
    static constexpr bool value = true;
};
#endif

// 16-bit param bits <-> float32 master (mirrors fastopt/cpu/convert.py).
// float32 -> float16 bits rounded stochastically (master_weights="none"): 13 random bits added
// below the kept mantissa, then truncated; subnormals from their exact fraction of an ulp.
FO_HD unsigned short float_to_fp16_stochastic(float f, unsigned rand16) {
    const unsigned u = float_bits(f);
    const unsigned sign = (u & 0x80000000u) >> 16;
    const unsigned a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (unsigned short)(sign | 0x7E00u);
    if (a >= (143u << 23)) return (unsigned short)(sign | 0x7C00u);
    if (a < (113u << 23)) {
        const float scaled = bits_float(a) * 16777216.0f;
        const float whole = floorf(scaled);
        const unsigned up = (scaled - whole) * 65536.0f > (float)rand16 ? 1u : 0u;
        return (unsigned short)(sign | ((unsigned)whole + up));
    }
    return (unsigned short)(sign | (((a + (rand16 >> 3)) >> 13) - (112u << 10)));
}

// The float32 master that bf16 param bits and their int16 remainder make
// (master_weights="remainder"): a negative remainder means the param was rounded up (its
// bits one more than the master's high half), unless the param is a NaN.
FO_HD float join_remainder(unsigned short bits, short remainder) {
    const unsigned high = bits;
    // (not on a NaN, nor on a zero: no master rounds up to one, and a param set to 0 in
    // place without refresh_master() keeps a stale remainder, which made it a NaN)
    const unsigned up = (remainder < 0 && (high & 0x7FFFu) - 1u < 0x7F80u) ? 1u : 0u;
    return bits_float(((high - up) << 16) | ((unsigned)remainder & 0xFFFFu));
}

// A float32 master as bf16 param bits (rounded to nearest, ties away from zero; a NaN keeps
// its high half, made quiet) and the int16 remainder (the master's low half).
FO_HD void split_master(float f, unsigned short& bits, short& remainder) {
    const unsigned u = float_bits(f);
    remainder = (short)(int)(u & 0xFFFFu) - ((u & 0x8000u) ? 65536 : 0);
    bits = (unsigned short)((u & 0x7FFFFFFFu) > 0x7F800000u ? ((u >> 16) | 0x40u)
                                                             : ((u + 0x8000u) >> 16));
}

// N consecutive raw 16-bit values (N > 1: one aligned vector access).
template <int N, typename U>
FO_HD void load_raw(const U* ptr, U (&out)[N]) {
    const Vec<U, N> vec = *reinterpret_cast<const Vec<U, N>*>(ptr);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = vec.v[j];
}

template <int N, typename U>
FO_HD void store_raw(U* ptr, const U (&in)[N]) {
    Vec<U, N> vec;
#pragma unroll
    for (int j = 0; j < N; ++j) vec.v[j] = in[j];
    *reinterpret_cast<Vec<U, N>*>(ptr) = vec;
}

// Whether the master buffer of ``master_mode`` is aligned for N-wide access of its elements.
template <int N, typename T>
FO_HD bool master_aligned(const float* master, int master_mode) {
    if (IsFloat<T>::value || master_mode == FO_MASTER_NONE) return true;
    return master_mode == FO_MASTER_FP32 ? aligned_for<N>(master)
                                         : aligned_for<N>(reinterpret_cast<const short*>(master));
}

// Params i..i+N-1 as float32. float32 params are read in place. 16-bit params keep their
// float32 values by ``master_mode`` (FO_MASTER_*, ``master_weights=``): in the float32 master
// (FP32), in the bf16 params and the int16 remainders ``master`` then points to (REMAINDER),
// or in the params alone (NONE).
template <int N, typename T>
FO_HD void load_param(const T* params, const float* master, int master_mode, long long i,
                      float (&out)[N]) {
    if constexpr (IsFloat<T>::value) {
        load<N>(params + i, out);
    } else {
        if (master_mode == FO_MASTER_FP32) {
            load<N>(master + i, out);
        } else if (master_mode == FO_MASTER_REMAINDER) {
            unsigned short bits[N];
            short rem[N];
            load_raw<N>(reinterpret_cast<const unsigned short*>(params) + i, bits);
            load_raw<N>(reinterpret_cast<const short*>(master) + i, rem);
#pragma unroll
            for (int j = 0; j < N; ++j) out[j] = join_remainder(bits[j], rem[j]);
        } else {
            load<N>(params + i, out);
        }
    }
}

// Params i..i+N-1 from float32 values: in place (float32 params); 16-bit params get the master
// and its rounding to nearest even (FP32), the rounding to nearest with ties away from zero
// and the remainder (REMAINDER), or a stochastic rounding by the step's ``seed`` (NONE).
template <int N, typename T>
FO_HD void store_param(T* params, float* master, int master_mode, long long i, unsigned seed,
                       const float (&in)[N]) {
    if constexpr (IsFloat<T>::value) {
        store<N>(params + i, in);
    } else {
        unsigned short bits[N];
        if (master_mode == FO_MASTER_FP32) {
            store<N>(master + i, in);
            store<N>(params + i, in);
            return;
        } else if (master_mode == FO_MASTER_REMAINDER) {
            short rem[N];
#pragma unroll
            for (int j = 0; j < N; ++j) split_master(in[j], bits[j], rem[j]);
            store_raw<N>(reinterpret_cast<short*>(master) + i, rem);
        } else {
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const unsigned rand16 = random32(i + j, seed ^ FO_PARAM_SALT) & 0xFFFFu;
                bits[j] = IsBf16<T>::value ? float_to_bf16_stochastic(in[j], rand16)
                                           : float_to_fp16_stochastic(in[j], rand16);
            }
        }
        store_raw<N>(reinterpret_cast<unsigned short*>(params) + i, bits);
    }
}

// State buffers: float32 as is, or bfloat16 bits rounded stochastically with the 16 bits of
// rnd[j] from ``shift`` (each buffer of an element takes different bits).
template <int N, typename S>
FO_HD void store_state(S* ptr, const float (&in)[N], const unsigned (&rnd)[N], int shift) {
    if constexpr (IsFloat<S>::value) {
        store<N>(ptr, in);
    } else {
        Vec<S, N> vec;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            vec.v[j] = float_to_bf16_stochastic(in[j], (rnd[j] >> shift) & 0xFFFFu);
        }
        if constexpr (N == 1) {
            *ptr = vec.v[0];
        } else {
            *reinterpret_cast<Vec<S, N>*>(ptr) = vec;
        }
    }
}

// Grid-stride loop: group(Width<N>{}, i) on N-element groups while every buffer is aligned
// for N-wide access (vector_ok), then group(Width<1>{}, i) on the tail. 64-bit indices.
template <int N, typename Group>
FO_D void grid_stride(long long n, bool vector_ok, Group&& group) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long groups = vector_ok ? n / N : 0;
    for (long long gi = first; gi < groups; gi += stride) group(Width<N>{}, gi * N);
    for (long long i = groups * N + first; i < n; i += stride) group(Width<1>{}, i);
}

// A chunk's loop (a block per chunk, FO_SEGMENT_BLOCK threads): group(Width<N>{}, i) on
// N-element groups from start while every buffer and start are aligned for N-wide access,
// then group(Width<1>{}, i) on the rest, up to stop. 64-bit indices.
template <int N, typename Group>
FO_D void chunk_stride(long long start, long long stop, bool vector_ok, Group&& group) {
    const long long groups = (vector_ok && start % N == 0) ? (stop - start) / N : 0;
    for (long long gi = threadIdx.x; gi < groups; gi += blockDim.x) group(Width<N>{}, start + gi * N);
    for (long long i = start + groups * N + threadIdx.x; i < stop; i += blockDim.x) {
        group(Width<1>{}, i);
    }
}

// Which elements an elementwise kernel's threads step: with Chunked false the whole buffer,
// [0, n), over the whole grid (a grid-stride loop); with Chunked true this block's chunk
// [span.first, span.stop) of one tensor (a multi-tensor launch's FO_MULTI_KERNEL entry
// points: a block per chunk). The element index i is the tensor's own either way.
struct FoSpan {
    long long first = 0, stop = 0;
};

template <int N, bool Chunked, typename Group>
FO_D void span_stride(const FoSpan& span, long long n, bool vector_ok, Group&& group) {
    if constexpr (Chunked) {
        chunk_stride<N>(span.first, span.stop, vector_ok, group);
    } else {
        grid_stride<N>(n, vector_ok, group);
    }
}

// The v of lane (this lane ^ o): a butterfly step of a warp's reduction. Every lane of the
// warp calls it (in the host emulation every thread of the block, alike).
FO_D double fo_shfl_xor(double v, unsigned o) {
#if defined(__CUDACC__)
    return __shfl_xor_sync(0xffffffffu, v, (int)o);
#else
    return fo_emulated_shfl_xor(v, o);
#endif
}

// int8 state (state_dtype="int8"; mirrors fastopt/cpu/int8.py and fastopt/_int8.py): a
// block's values x are stored as y = x / absmax in one byte, an 8-bit float with
// FO_INT8_MANTISSA_BITS mantissa bits (code 0 is 0; a signed state's bit 7 is its sign),
// rounded stochastically with ``rand`` (the bits below the kept mantissa).
#define FO_INT8_SHIFT (23 - FO_INT8_MANTISSA_BITS)
#define FO_INT8_BIAS(E) ((127 - (1 << (E)) + 1) << FO_INT8_MANTISSA_BITS)
#define FO_INT8_ONE(E) ((127 << FO_INT8_MANTISSA_BITS) - FO_INT8_BIAS(E))
#define FO_MIN_NORMAL 1.17549435e-38f

// Below the smallest code's value s = 2^(2 - 2^E): 0 or that code, SMALLEST when |y| > rand
// * s / 2^SHIFT (unbiased: probability |y| / s) for signed states; for non-negative ones
// (second moments) whenever y != 0, so that a kept first moment never meets a zero second
// moment (a step m / sqrt(v) up to 100x too large).
template <int E, bool Signed>
FO_HD unsigned int8_encode_magnitude(float y, unsigned rand) {
    const unsigned a = float_bits(y) & 0x7FFFFFFFu;
    int code = (int)((a + rand) >> FO_INT8_SHIFT) - FO_INT8_BIAS(E);
    const float floor_step =
        Signed ? bits_float((unsigned)(129 - (1 << E) - FO_INT8_SHIFT) << 23) : 0.0f;
    const int small = fabsf(y) > (float)rand * floor_step ? (1 << FO_INT8_MANTISSA_BITS) : 0;
    code = code >= (1 << FO_INT8_MANTISSA_BITS) ? code : small;
    return (unsigned)(code <= FO_INT8_ONE(E) ? code : FO_INT8_ONE(E));
}

template <int E>
FO_HD float int8_decode_magnitude(unsigned magnitude) {
    return magnitude ? bits_float((magnitude + FO_INT8_BIAS(E)) << FO_INT8_SHIFT) : 0.0f;
}

FO_HD float int8_decode_signed(unsigned char code) {
    const float v = int8_decode_magnitude<FO_INT8_EXPONENT_BITS_SIGNED>(code & 0x7Fu);
    return (code & 0x80u) ? -v : v;
}

FO_HD float int8_decode_nonnegative(unsigned char code) {
    return int8_decode_magnitude<FO_INT8_EXPONENT_BITS_NONNEGATIVE>(code);
}

FO_HD unsigned char int8_encode_signed(float y, unsigned rand) {
    const unsigned sign = (float_bits(y) >> 24) & 0x80u;
    return (unsigned char)(int8_encode_magnitude<FO_INT8_EXPONENT_BITS_SIGNED, true>(y, rand)
                           | sign);
}

FO_HD unsigned char int8_encode_nonnegative(float y, unsigned rand) {
    return (unsigned char)int8_encode_magnitude<FO_INT8_EXPONENT_BITS_NONNEGATIVE, false>(y,
                                                                                      rand);
}

// Element k of lane ``lane`` in a warp's block b of int8 state: strided (k * 32 + lane: a
// scalar access per element, coalesced across the warp) or, with Vector, consecutive
// (lane * K + k: one vector access per lane and buffer).
template <int K, bool Vector>
FO_HD long long int8_index(long long b, unsigned lane, int k) {
    return b * FO_INT8_BLOCK + (Vector ? (long long)lane * K + k : (long long)k * 32 + lane);
}

// K codes at p (Vector: one K-byte access; K * lane bytes from a block's start, aligned).
template <int K, bool Vector>
FO_HD void load_codes(const unsigned char* codes, long long b, unsigned lane, long long n,
                      unsigned char (&out)[K]) {
    if constexpr (Vector) {
        const Vec<unsigned char, K> v = *reinterpret_cast<const Vec<unsigned char, K>*>(
            codes + int8_index<K, true>(b, lane, 0));
#pragma unroll
        for (int k = 0; k < K; ++k) out[k] = v.v[k];
    } else {
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const long long i = int8_index<K, false>(b, lane, k);
            if (i < n) out[k] = codes[i];
        }
    }
}

// A warp's block b of int8 state: lane ``lane`` holds its elements (int8_index) in x. Stores
// their codes against the block's new absmax (the largest of their bits without the sign: a
// NaN is the max) and the absmax (an absmax below float32's smallest normal number stores
// the block as zeros). Every lane of the warp calls it, b >= blocks included (they store
// nothing); with Vector the block is whole.
template <int K, bool Signed, bool Vector>
FO_D void int8_store_block(unsigned char* codes, float* scales, long long b, long long blocks,
                           long long n, unsigned lane, const float (&x)[K], unsigned seed) {
    unsigned top = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const long long i = int8_index<K, Vector>(b, lane, k);
        const unsigned bits = float_bits(x[k]) & 0x7FFFFFFFu;
        if (b < blocks && i < n && bits > top) top = bits;
    }
    for (unsigned o = 16; o > 0; o /= 2) {
        const unsigned other = (unsigned)fo_shfl_xor((double)top, o);
        top = other > top ? other : top;
    }
    if (b >= blocks) return;
    const float absmax = bits_float(top);
    const bool normal = absmax >= FO_MIN_NORMAL;
    const float inv = normal ? 1.0f / absmax : 0.0f;
    Vec<unsigned char, K> out;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const long long i = int8_index<K, Vector>(b, lane, k);
        const unsigned rand = random32(i, seed) & ((1u << FO_INT8_SHIFT) - 1u);
        out.v[k] = Signed ? int8_encode_signed(x[k] * inv, rand)
                          : int8_encode_nonnegative(x[k] * inv, rand);
        if (!Vector && i < n) codes[i] = out.v[k];
    }
    if constexpr (Vector) {
        *reinterpret_cast<Vec<unsigned char, K>*>(codes + int8_index<K, true>(b, lane, 0)) = out;
    }
    if (lane == 0) scales[b] = (normal || absmax != absmax) ? absmax : 0.0f;
}

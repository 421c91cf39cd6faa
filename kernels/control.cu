// The global gradient norm of a step, its clip coefficient and its skip flag, computed on the
// device (part of the driver; not generated): a clipped or skippable step then needs no host
// sync and can be captured in a CUDA graph. Two launches, no atomics, every sum in a fixed
// order, so the result is the same from run to run:
//   fo_grad_sq_<T>:  every thread sums the squares of its grid-stride elements (as float64);
//                    thread 0 of each block adds its block's sums in thread order into
//                    partial[block];
//   fo_grad_control: one block; thread t sums partial[t], partial[t + blockDim], ...; thread
//                    0 adds those in thread order: norm = sqrt(sum) * mult, then control[0]
//                    = the clip coefficient (torch's clip_grad_norm_: max_norm / (norm +
//                    1e-6), 1 where that is >= 1, NaN stays NaN; 1 without clipping) and
//                    control[1] = 1 if the step is skipped (skip set, norm not finite).
// (The sums were once folded by a single block over one value per thread of the grid: on an
// H200 that chain of dependent global loads took ~200 us a step; bench/NOTES.md.)
// Blocks have at most FO_REDUCE_THREADS threads (signature.cuh). The update kernels read control
// (KERNEL_SIGNATURE in fastopt/algorithms/_spec.py).
#include "common.cuh"
#include "signature.cuh"

// thread 0, after the block's threads have each stored their sum in `sums`: their total in
// thread order
FO_D double fo_block_total(double* sums, double mine) {
    sums[threadIdx.x] = mine;
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x == 0) {
        for (unsigned t = 0; t < blockDim.x; ++t) total += sums[t];
    }
    return total;
}

template <typename T>
FO_D void fo_grad_sq(const T* grads, long long n, double* partial) {
    __shared__ double sums[FO_REDUCE_THREADS];
    const long long stride = (long long)gridDim.x * blockDim.x;
    double sum = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double g = (double)to_float(grads[i]);
        sum += g * g;
    }
    const double total = fo_block_total(sums, sum);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

extern "C" __global__ void fo_grad_sq_f32(const float* grads, long long n, double* partial) {
    fo_grad_sq<float>(grads, n, partial);
}

extern "C" __global__ void fo_grad_control(const double* partial, long long parts,
                                           double mult, double max_norm, int skip,
                                           double* norm_out, double* control) {
    __shared__ double sums[FO_REDUCE_THREADS];
    if (blockIdx.x != 0) return;
    double sum = 0.0;
    for (long long i = threadIdx.x; i < parts; i += blockDim.x) sum += partial[i];
    const double total = fo_block_total(sums, sum);
    if (threadIdx.x != 0) return;
    const double norm = sqrt(total) * mult;
    norm_out[0] = norm;
    double coef = 1.0;
    if (max_norm > 0.0) {
        coef = max_norm / (norm + 1e-6);
        if (coef >= 1.0) coef = 1.0;  // (a NaN coefficient stays NaN, as in torch)
    }
    control[0] = coef;
    control[1] = (skip && !isfinite(norm)) ? 1.0 : 0.0;
}

#if defined(__CUDACC__)
extern "C" __global__ void fo_grad_sq_f16(const __half* grads, long long n, double* partial) {
    fo_grad_sq<__half>(grads, n, partial);
}

extern "C" __global__ void fo_grad_sq_bf16(const __nv_bfloat16* grads, long long n,
                                           double* partial) {
    fo_grad_sq<__nv_bfloat16>(grads, n, partial);
}
#endif

// The global gradient norm of a step, its clip coefficient and its skip flag, computed on the
// device (part of the driver; not generated): a clipped or skippable step then needs no host
// sync and can be captured in a CUDA graph. Three launches, no shared memory, no atomics, so
// the sum's order is fixed and the result is the same from run to run:
//   fo_grad_sq_<T>:  every thread of the grid sums the squares of its grid-stride elements
//                    (as float64) into partial[its global index];
//   fo_grad_sq_fold: one block; thread t sums partial[t], partial[t + blockDim], ...;
//   fo_grad_control: one thread sums the folds in order: norm = sqrt(sum) * mult, then
//                    control[0] = the clip coefficient (torch's clip_grad_norm_: max_norm /
//                    (norm + 1e-6), 1 where that is >= 1, NaN stays NaN; 1 without clipping)
//                    and control[1] = 1 if the step is skipped (skip set, norm not finite).
// The update kernels read control (KERNEL_SIGNATURE in fastopt/algorithms/_spec.py).
#include "common.cuh"

template <typename T>
FO_D void fo_grad_sq(const T* grads, long long n, double* partial) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    double sum = 0.0;
    for (long long i = first; i < n; i += stride) {
        const double g = (double)to_float(grads[i]);
        sum += g * g;
    }
    partial[first] = sum;
}

extern "C" __global__ void fo_grad_sq_f32(const float* grads, long long n, double* partial) {
    fo_grad_sq<float>(grads, n, partial);
}

extern "C" __global__ void fo_grad_sq_fold(const double* partial, long long parts,
                                           double* folded) {
    double sum = 0.0;
    for (long long i = threadIdx.x; i < parts; i += blockDim.x) sum += partial[i];
    folded[threadIdx.x] = sum;
}

extern "C" __global__ void fo_grad_control(const double* folded, int count, double mult,
                                           double max_norm, int skip, double* norm_out,
                                           double* control) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double sum = 0.0;
    for (int i = 0; i < count; ++i) sum += folded[i];
    const double norm = sqrt(sum) * mult;
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

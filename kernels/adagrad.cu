// Adagrad update kernels (mirrors fastopt/cpu/adagrad.py).
//
// Per element, with grad_factor = grad_mult (1/loss scale x clip coefficient), negated if
// maximize:
//     grad = grad_factor * g + weight_decay * p
//     sum  = sum + grad^2
//     p    = p - clr * grad / (sqrt(sum) + eps)
// with clr = lr / (1 + (k - 1) * lr_decay), lr = schedule(k - 1) * lr_scale, k the 1-based step.
#include "common.cuh"
#include "schedule.cuh"

// The per-element Adagrad math; every scalar is float32.
FO_HD void adagrad_element(float& param, float g, float& state_sum, float grad_factor,
                           float weight_decay, float clr, float eps) {
    const float grad = grad_factor * g + weight_decay * param;
    const float s = state_sum + grad * grad;
    state_sum = s;
    param = param - clr * (grad / (sqrtf(s) + eps));
}

// One Adagrad step k = step_state[0] + 1 over the whole buffer; the last block advances k.
template <typename T, typename S>
FO_D void adagrad(T* params, const T* grads, float* master, S* state_sum, const double* table,
                  int table_rows, unsigned long long* step_state, double* lr_out,
                  double lr_scale, double grad_mult, double lr_decay, double eps,
                  double weight_decay, int maximize, long long n) {
    const double step = (double)(step_state[0] + 1);
    const double lr = lr_at(table, table_rows, step - 1.0) * lr_scale;
    const unsigned seed = step_seed(step_state[0] + 1);  // stochastic rounding of bf16 state
    const float clr = (float)(lr / (1.0 + (step - 1.0) * lr_decay));
    const float grad_factor = (float)((maximize ? -1.0 : 1.0) * grad_mult);
    const float weight_decay32 = (float)weight_decay;
    const float eps32 = (float)eps;
    constexpr int N = VecWidth<T>::value;
    const bool vector_ok = aligned_for<N>(params) && aligned_for<N>(grads) &&
                           (IsFloat<T>::value || aligned_for<N>(master)) &&
                           aligned_for<N>(state_sum);
    grid_stride<N>(n, vector_ok, [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        float p[W], g[W], s[W];
        load_param<W>(params + i, master + i, p);
        load<W>(grads + i, g);
        load<W>(state_sum + i, s);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            adagrad_element(p[j], g[j], s[j], grad_factor, weight_decay32, clr, eps32);
        }
        store_param<W>(params + i, master + i, p);
        unsigned rnd[W];  // stochastic rounding bits for bf16 state (unused for float32)
#pragma unroll
        for (int j = 0; j < W; ++j) rnd[j] = random32(i + j, seed);
        store_state<W>(state_sum + i, s, rnd, 0);
    });
    finish_step(step_state, lr_out, lr);
}

#define FO_ADAGRAD_KERNEL(NAME, T, S)                                                         \
    extern "C" __global__ void NAME(T* params, const T* grads, float* master,                 \
                                    S* state_sum,                                             \
                                    const double* table, int table_rows,                      \
                                    unsigned long long* step_state, double* lr_out,           \
                                    double lr_scale, double grad_mult, double lr_decay,       \
                                    double eps, double weight_decay, int maximize,            \
                                    long long n) {                                            \
        adagrad<T, S>(params, grads, master, state_sum, table, table_rows, step_state, lr_out, \
                   lr_scale, grad_mult, lr_decay, eps, weight_decay, maximize, n);            \
    }

FO_ADAGRAD_KERNEL(adagrad_f32, float, float)
FO_ADAGRAD_KERNEL(adagrad_f32_sbf16, float, bf16_bits)
#if defined(__CUDACC__)
FO_ADAGRAD_KERNEL(adagrad_f16, __half, float)
FO_ADAGRAD_KERNEL(adagrad_bf16, __nv_bfloat16, float)
FO_ADAGRAD_KERNEL(adagrad_f16_sbf16, __half, bf16_bits)
FO_ADAGRAD_KERNEL(adagrad_bf16_sbf16, __nv_bfloat16, bf16_bits)
#endif

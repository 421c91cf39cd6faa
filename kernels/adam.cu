// Adam / AdamW update kernels (mirrors fastopt/cpu/adam.py).
//
// Per element, with grad_factor = grad_mult (1/loss scale x clip coefficient), negated if
// maximize, l2 = weight_decay for Adam (0 for AdamW) and
// decay = 1 - lr * weight_decay for AdamW (1 for Adam):
//     grad  = grad_factor * g + l2 * p
//     m     = m + (1 - beta1) * (grad - m)
//     v     = beta2 * v + (1 - beta2) * grad^2
//     vmax  = max(vmax, v)                      (amsgrad; v := vmax below)
//     p     = decay * p - step_size * m / (sqrt(v) / sqrt(1 - beta2^k) + eps)
// with step_size = lr / (1 - beta1^k), lr = schedule(k - 1) * lr_scale, k the 1-based step.
#include "common.cuh"
#include "schedule.cuh"

// The per-element Adam math; every scalar is float32.
FO_HD void adam_element(float& param, float g, float& exp_avg, float& exp_avg_sq,
                        float& max_exp_avg_sq, bool amsgrad, float grad_factor, float l2,
                        float decay, float one_minus_beta1, float beta2, float one_minus_beta2,
                        float step_size, float inv_bc2_sqrt, float eps) {
    const float grad = grad_factor * g + l2 * param;
    const float m = exp_avg + one_minus_beta1 * (grad - exp_avg);
    float v = beta2 * exp_avg_sq + one_minus_beta2 * (grad * grad);
    exp_avg = m;
    exp_avg_sq = v;
    if (amsgrad) {
        v = fmaxf(max_exp_avg_sq, v);
        max_exp_avg_sq = v;
    }
    const float denom = sqrtf(v) * inv_bc2_sqrt + eps;
    param = decay * param - step_size * (m / denom);
}

// One Adam(W) step k = step_state[0] + 1 over the whole buffer; the last block advances k.
template <typename T, typename S>
FO_D void adam(T* params, const T* grads, float* master, S* exp_avg, S* exp_avg_sq,
               S* max_exp_avg_sq, const double* table, int table_rows,
               unsigned long long* step_state, double* lr_out, double lr_scale,
               double grad_mult, double beta1, double beta2, double eps, double weight_decay,
               int decoupled, int amsgrad, int maximize, long long n) {
    const double step = (double)(step_state[0] + 1);
    const double lr = lr_at(table, table_rows, step - 1.0) * lr_scale;
    const unsigned seed = step_seed(step_state[0] + 1);  // stochastic rounding of bf16 state
    const double bias_correction1 = 1.0 - pow(beta1, step);
    const double bias_correction2 = 1.0 - pow(beta2, step);
    const float step_size = (float)(lr / bias_correction1);
    const float inv_bc2_sqrt = (float)(1.0 / sqrt(bias_correction2));
    const float grad_factor = (float)((maximize ? -1.0 : 1.0) * grad_mult);
    const float l2 = (float)(decoupled ? 0.0 : weight_decay);
    const float decay = (float)(decoupled ? 1.0 - lr * weight_decay : 1.0);
    const float one_minus_beta1 = (float)(1.0 - beta1);
    const float one_minus_beta2 = (float)(1.0 - beta2);
    const float beta2_32 = (float)beta2;
    const float eps32 = (float)eps;
    constexpr int N = VecWidth<T>::value;
    const bool vector_ok = aligned_for<N>(params) && aligned_for<N>(grads) &&
                           (IsFloat<T>::value || aligned_for<N>(master)) &&
                           aligned_for<N>(exp_avg) && aligned_for<N>(exp_avg_sq) &&
                           (!amsgrad || aligned_for<N>(max_exp_avg_sq));
    grid_stride<N>(n, vector_ok, [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        float p[W], g[W], m[W], v[W], vmax[W] = {};  // vmax is only read with amsgrad
        load_param<W>(params + i, master + i, p);
        load<W>(grads + i, g);
        load<W>(exp_avg + i, m);
        load<W>(exp_avg_sq + i, v);
        if (amsgrad) load<W>(max_exp_avg_sq + i, vmax);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            adam_element(p[j], g[j], m[j], v[j], vmax[j], amsgrad, grad_factor, l2, decay,
                         one_minus_beta1, beta2_32, one_minus_beta2, step_size, inv_bc2_sqrt,
                         eps32);
        }
        store_param<W>(params + i, master + i, p);
        unsigned rnd[W];  // stochastic rounding bits for bf16 state (unused for float32)
#pragma unroll
        for (int j = 0; j < W; ++j) rnd[j] = random32(i + j, seed);
        store_state<W>(exp_avg + i, m, rnd, 0);
        store_state<W>(exp_avg_sq + i, v, rnd, 16);
        if (amsgrad) store_state<W>(max_exp_avg_sq + i, vmax, rnd, 8);
    });
    finish_step(step_state, lr_out, lr);
}

#define FO_ADAM_KERNEL(NAME, T, S)                                                            \
    extern "C" __global__ void NAME(T* params, const T* grads, float* master,                 \
                                    S* exp_avg, S* exp_avg_sq,                                \
                                    S* max_exp_avg_sq,                                        \
                                    const double* table, int table_rows,                      \
                                    unsigned long long* step_state, double* lr_out,           \
                                    double lr_scale, double grad_mult, double beta1,          \
                                    double beta2, double eps, double weight_decay,            \
                                    int decoupled, int amsgrad, int maximize, long long n) {  \
        adam<T, S>(params, grads, master, exp_avg, exp_avg_sq, max_exp_avg_sq, table,         \
                table_rows, step_state, lr_out, lr_scale, grad_mult, beta1, beta2, eps,       \
                weight_decay, decoupled, amsgrad, maximize, n);                               \
    }

FO_ADAM_KERNEL(adam_f32, float, float)
FO_ADAM_KERNEL(adam_f32_sbf16, float, bf16_bits)
#if defined(__CUDACC__)
FO_ADAM_KERNEL(adam_f16, __half, float)
FO_ADAM_KERNEL(adam_bf16, __nv_bfloat16, float)
FO_ADAM_KERNEL(adam_f16_sbf16, __half, bf16_bits)
FO_ADAM_KERNEL(adam_bf16_sbf16, __nv_bfloat16, bf16_bits)
#endif

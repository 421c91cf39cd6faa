// Adadelta update kernels (mirrors fastopt/cpu/adadelta.py).
//
// Per element, with grad_factor = grad_mult (1/loss scale x clip coefficient), negated if
// maximize:
//     grad  = grad_factor * g + weight_decay * p
//     sq    = rho * sq + (1 - rho) * grad^2
//     delta = sqrt(acc + eps) / sqrt(sq + eps) * grad
//     acc   = rho * acc + (1 - rho) * delta^2
//     p     = p - lr * delta
// with lr = schedule(k - 1) * lr_scale, k the 1-based step.
#include "common.cuh"
#include "schedule.cuh"

// The per-element Adadelta math; every scalar is float32.
FO_HD void adadelta_element(float& param, float g, float& square_avg, float& acc_delta,
                            float grad_factor, float weight_decay, float rho, float one_minus_rho,
                            float eps, float lr) {
    const float grad = grad_factor * g + weight_decay * param;
    const float sq = rho * square_avg + one_minus_rho * (grad * grad);
    square_avg = sq;
    const float delta = sqrtf(acc_delta + eps) / sqrtf(sq + eps) * grad;
    acc_delta = rho * acc_delta + one_minus_rho * (delta * delta);
    param = param - lr * delta;
}

// One Adadelta step k = step_state[0] + 1 over the whole buffer; the last block advances k.
template <typename T, typename S>
FO_D void adadelta(T* params, const T* grads, float* master, S* square_avg, S* acc_delta,
                   const double* table, int table_rows, unsigned long long* step_state,
                   double* lr_out, double lr_scale, double grad_mult, double rho, double eps,
                   double weight_decay, int maximize, long long n) {
    const double step = (double)(step_state[0] + 1);
    const double lr = lr_at(table, table_rows, step - 1.0) * lr_scale;
    const unsigned seed = step_seed(step_state[0] + 1);  // stochastic rounding of bf16 state
    const float grad_factor = (float)((maximize ? -1.0 : 1.0) * grad_mult);
    const float weight_decay32 = (float)weight_decay;
    const float rho32 = (float)rho;
    const float one_minus_rho = (float)(1.0 - rho);
    const float eps32 = (float)eps;
    const float lr32 = (float)lr;
    constexpr int N = VecWidth<T>::value;
    const bool vector_ok = aligned_for<N>(params) && aligned_for<N>(grads) &&
                           (IsFloat<T>::value || aligned_for<N>(master)) &&
                           aligned_for<N>(square_avg) && aligned_for<N>(acc_delta);
    grid_stride<N>(n, vector_ok, [&](auto width, long long i) {
        constexpr int W = decltype(width)::value;
        float p[W], g[W], sq[W], acc[W];
        load_param<W>(params + i, master + i, p);
        load<W>(grads + i, g);
        load<W>(square_avg + i, sq);
        load<W>(acc_delta + i, acc);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            adadelta_element(p[j], g[j], sq[j], acc[j], grad_factor, weight_decay32, rho32,
                             one_minus_rho, eps32, lr32);
        }
        store_param<W>(params + i, master + i, p);
        unsigned rnd[W];  // stochastic rounding bits for bf16 state (unused for float32)
#pragma unroll
        for (int j = 0; j < W; ++j) rnd[j] = random32(i + j, seed);
        store_state<W>(square_avg + i, sq, rnd, 0);
        store_state<W>(acc_delta + i, acc, rnd, 16);
    });
    finish_step(step_state, lr_out, lr);
}

#define FO_ADADELTA_KERNEL(NAME, T, S)                                                        \
    extern "C" __global__ void NAME(T* params, const T* grads, float* master,                 \
                                    S* square_avg,                                            \
                                    S* acc_delta, const double* table, int table_rows,        \
                                    unsigned long long* step_state, double* lr_out,           \
                                    double lr_scale, double grad_mult, double rho,            \
                                    double eps, double weight_decay, int maximize,            \
                                    long long n) {                                            \
        adadelta<T, S>(params, grads, master, square_avg, acc_delta, table, table_rows,       \
                    step_state, lr_out, lr_scale, grad_mult, rho, eps, weight_decay,          \
                    maximize, n);                                                             \
    }

FO_ADADELTA_KERNEL(adadelta_f32, float, float)
FO_ADADELTA_KERNEL(adadelta_f32_sbf16, float, bf16_bits)
#if defined(__CUDACC__)
FO_ADADELTA_KERNEL(adadelta_f16, __half, float)
FO_ADADELTA_KERNEL(adadelta_bf16, __nv_bfloat16, float)
FO_ADADELTA_KERNEL(adadelta_f16_sbf16, __half, bf16_bits)
FO_ADADELTA_KERNEL(adadelta_bf16_sbf16, __nv_bfloat16, bf16_bits)
#endif

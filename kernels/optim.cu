// optim.cu: fused optimizer steps over a flat parameter buffer.
//
// The optimizer keeps all parameters of one dtype as views of one contiguous buffer,
// with gradients and states laid out the same way, so one launch updates them all.
// Semantics follow torch.optim (single-tensor code path, maximize=False).
//
// Per-step scalars (for a step replayed from a CUDA graph, where launch arguments are frozen): with
// use_scalars = 0 they are the launch arguments; with use_scalars = 1 each thread reads them once
// from scalars (double, device memory, written by the host before the launch) and rounds them to T
// as the host would (double -> T, round to nearest: the same bits as the arguments).
//   sgd_update   scalars[0] = lr
//   adam_update  scalars = {step_size, bc2, decay}
#include "common.cuh"

// ---- SGD with momentum, Nesterov and L2 weight decay ----------------------------------
//   d = g + weight_decay * p                       (when weight_decay != 0)
//   if momentum != 0:
//       buf = d                                    on the first step
//       buf = momentum * buf + d                   afterwards
//       d = d + momentum * buf   if nesterov  else  d = buf
//   p = p - lr * d
// buf is neither read nor written when momentum == 0 (pass p for it). scalars (1,) = {lr}, read
// when use_scalars (else not read: any double array).
#define SGD_PARAMS(T)                                                                   \
    T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, long long n, T lr, \
    T momentum, T weight_decay, int nesterov, int first_step, const double* __restrict__ scalars, int use_scalars
#define SGD_ARGS p, g, buf, n, lr, momentum, weight_decay, nesterov, first_step, scalars, use_scalars

template <typename T>
__device__ __forceinline__ void sgd_update_body(SGD_PARAMS(T)) {
    if (use_scalars) lr = T(scalars[0]);
    CNN_GRID_STRIDE_LOOP(i, n) {
        const T pi = p[i];
        T d = g[i];
        if (weight_decay != T(0)) d = d + weight_decay * pi;
        if (momentum != T(0)) {
            const T b = first_step ? d : momentum * buf[i] + d;
            buf[i] = b;
            d = nesterov ? d + momentum * b : b;
        }
        p[i] = pi - lr * d;
    }
}
CNN_ENTRY_POINTS(sgd_update, SGD_PARAMS, SGD_ARGS)

// ---- Adam / AdamW --------------------------------------------------------------------
//   decoupled (AdamW): p = p * decay                     decay = 1 - lr * weight_decay
//   else (Adam):       g = g + weight_decay * p          (both only when weight_decay != 0)
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * (g * g)
//   p = p - step_size * m / (sqrt(v / bc2) + eps)        step_size = lr / bc1
// with bc1 = 1 - beta1^t, bc2 = 1 - beta2^t (t = the step number, from 1). The host
// computes decay, step_size, 1 - beta1 and 1 - beta2 in double precision and passes
// them rounded to T, exactly like the NumPy path in cnn_gpu/optim.py (bitwise parity). With
// use_scalars the step's scalars (3,) = {step_size, bc2, decay} come from device memory instead.
#define ADAM_PARAMS(T)                                                                  \
    T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,   \
    long long n, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T eps,         \
    T weight_decay, int decoupled, T decay, T step_size, T bc2,                         \
    const double* __restrict__ scalars, int use_scalars
#define ADAM_ARGS                                                                                               \
    p, g, m, v, n, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decoupled, decay, step_size, \
        bc2, scalars, use_scalars

template <typename T>
__device__ __forceinline__ void adam_update_body(ADAM_PARAMS(T)) {
    if (use_scalars) {
        step_size = T(scalars[0]);
        bc2 = T(scalars[1]);
        decay = T(scalars[2]);
    }
    CNN_GRID_STRIDE_LOOP(i, n) {
        T pi = p[i];
        T gi = g[i];
        if (weight_decay != T(0)) {
            if (decoupled) {
                pi = pi * decay;
            } else {
                gi = gi + weight_decay * pi;
            }
        }
        const T mi = beta1 * m[i] + one_minus_beta1 * gi;
        const T vi = beta2 * v[i] + one_minus_beta2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        const T denom = cnn_sqrt(vi / bc2) + eps;
        p[i] = pi - step_size * mi / denom;
    }
}
CNN_ENTRY_POINTS(adam_update, ADAM_PARAMS, ADAM_ARGS)

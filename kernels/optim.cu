// optim.cu: fused optimizer steps over a flat parameter buffer.
//
// The optimizer keeps all parameters of one dtype as views of one contiguous buffer,
// with gradients and states laid out the same way, so one launch updates them all.
// Semantics follow torch.optim (single-tensor code path, maximize=False).
#include "common.cuh"

// ---- SGD with momentum, Nesterov and L2 weight decay ----------------------------------
//   d = g + weight_decay * p                       (when weight_decay != 0)
//   if momentum != 0:
//       buf = d                                    on the first step
//       buf = momentum * buf + d                   afterwards
//       d = d + momentum * buf   if nesterov  else  d = buf
//   p = p - lr * d
// buf is neither read nor written when momentum == 0 (pass p for it).
#define SGD_PARAMS(T)                                                                   \
    T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, long long n, T lr, \
    T momentum, T weight_decay, int nesterov, int first_step
#define SGD_ARGS p, g, buf, n, lr, momentum, weight_decay, nesterov, first_step

template <typename T>
__device__ __forceinline__ void sgd_update_body(SGD_PARAMS(T)) {
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
// them rounded to T, exactly like the NumPy path in cnn_gpu/optim.py (bitwise parity).
#define ADAM_PARAMS(T)                                                                  \
    T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,   \
    long long n, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T eps,         \
    T weight_decay, int decoupled, T decay, T step_size, T bc2
#define ADAM_ARGS \
    p, g, m, v, n, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decoupled, decay, step_size, bc2

template <typename T>
__device__ __forceinline__ void adam_update_body(ADAM_PARAMS(T)) {
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

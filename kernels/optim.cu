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
//
// float16 training (cnn_gpu/precision.py) keeps float32 master weights: sgd_update_master_f16 and
// adam_update_master_f16 run the same per-element update (cnn_sgd_element, cnn_adam_element) on the
// unscaled gradient g / scale[0], write the float16 copy the forward reads, and do nothing when the
// loss scaler's found[0] is set (kernels/scaler.cu). Their update has no first-step branch: the
// momentum buffer starts at zeros, and momentum * 0 + d = d, the value sgd_update's first step
// stores (a skipped first step then needs no host bookkeeping).
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

// One element: the new p from p = pi and d (the gradient), buf[i] read and written when momentum != 0
// (first_step: buf = d). sgd_update and the float16 path's sgd_update_master share it.
template <typename T>
__device__ __forceinline__ T cnn_sgd_element(
    T pi, T d, T* __restrict__ bufi, T lr, T momentum, T weight_decay, int nesterov, int first_step) {
    if (weight_decay != T(0)) d = d + weight_decay * pi;
    if (momentum != T(0)) {
        const T b = first_step ? d : momentum * bufi[0] + d;
        bufi[0] = b;
        d = nesterov ? d + momentum * b : b;
    }
    return pi - lr * d;
}

template <typename T>
__device__ __forceinline__ void sgd_update_body(SGD_PARAMS(T)) {
    if (use_scalars) lr = T(scalars[0]);
    CNN_GRID_STRIDE_LOOP(i, n) {
        p[i] = cnn_sgd_element(p[i], g[i], buf + i, lr, momentum, weight_decay, nesterov, first_step);
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

// The step's per-element constants (T: the weights' type).
template <typename T>
struct cnn_adam_consts {
    T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bc2;
    int decoupled;
};

// One element: the new p from p = pi and the gradient gi, m[i] and v[i] read and written.
// adam_update and the float16 path's adam_update_master share it.
template <typename T>
__device__ __forceinline__ T cnn_adam_element(T pi, T gi, T* __restrict__ mi_, T* __restrict__ vi_, const cnn_adam_consts<T>& k) {
    if (k.weight_decay != T(0)) {
        if (k.decoupled) {
            pi = pi * k.decay;
        } else {
            gi = gi + k.weight_decay * pi;
        }
    }
    const T mi = k.beta1 * mi_[0] + k.one_minus_beta1 * gi;
    const T vi = k.beta2 * vi_[0] + k.one_minus_beta2 * (gi * gi);
    mi_[0] = mi;
    vi_[0] = vi;
    const T denom = cnn_sqrt(vi / k.bc2) + k.eps;
    return pi - k.step_size * mi / denom;
}

template <typename T>
__device__ __forceinline__ void adam_update_body(ADAM_PARAMS(T)) {
    if (use_scalars) {
        step_size = T(scalars[0]);
        bc2 = T(scalars[1]);
        decay = T(scalars[2]);
    }
    const cnn_adam_consts<T> k = {beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bc2, decoupled};
    CNN_GRID_STRIDE_LOOP(i, n) { p[i] = cnn_adam_element(p[i], g[i], m + i, v + i, k); }
}
CNN_ENTRY_POINTS(adam_update, ADAM_PARAMS, ADAM_ARGS)

// ---- SGD on float32 master weights, the float16 copy written, skipped on overflow -------------
//   d = g / scale + weight_decay * p;  buf = momentum * buf + d;  d = d + momentum * buf (Nesterov)
//   or buf;  p = p - lr * d;  p16 = half(p)          (momentum == 0: d as it is, buf not touched)
// T is the master weights' type (float); lr from scalars[0] with use_scalars (as sgd_update's).
#define SGD_MASTER_PARAMS(T)                                                                       \
    T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, __half* __restrict__ p16,     \
    long long n, T lr, T momentum, T weight_decay, int nesterov, const T* __restrict__ scale,      \
    const int* __restrict__ found, const double* __restrict__ scalars, int use_scalars
#define SGD_MASTER_ARGS p, g, buf, p16, n, lr, momentum, weight_decay, nesterov, scale, found, scalars, use_scalars

#ifdef CNN_FP16
template <typename T>
__device__ __forceinline__ void sgd_update_master_body(SGD_MASTER_PARAMS(T)) {
    if (found[0]) return;  // an inf or NaN gradient: the step is skipped (the same for every thread)
    if (use_scalars) lr = T(scalars[0]);
    const T inv_scale = T(1) / scale[0];  // scale is a power of 2: exact
    CNN_GRID_STRIDE_LOOP(i, n) {
        const T q = cnn_sgd_element(p[i], g[i] * inv_scale, buf + i, lr, momentum, weight_decay, nesterov, 0);
        p[i] = q;
        p16[i] = __float2half_rn((float)q);
    }
}
#endif
// One entry point, named for the model's float16 storage (float32 masters): compiled with the
// other float16 ones (CNN_FP16, kernels/common.cuh).
#ifdef CNN_FP16
extern "C" __global__ void sgd_update_master_f16(SGD_MASTER_PARAMS(float)) {
    sgd_update_master_body<float>(SGD_MASTER_ARGS);
}
#endif

// ---- Adam / AdamW on float32 master weights, the float16 copy written, skipped on overflow ------
// adam_update on g / scale, with the step's scalars formed here in double precision, as
// the host forms them for adam_update: t = taken[0] + 1 (the steps taken, not counting skipped
// ones), bc1 = 1 - beta1^t, bc2 = 1 - beta2^t, step_size = lr / bc1, decay = 1 - lr * weight_decay;
// lr = scalars[0] with use_scalars (the optimizer's device scalars), else the argument.
#define ADAM_MASTER_PARAMS(T)                                                                              \
    T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v, __half* __restrict__ p16, \
    long long n, double lr, double beta1, double beta2, T eps, double weight_decay, int decoupled,            \
    const T* __restrict__ scale, const int* __restrict__ found, const int* __restrict__ taken,                \
    const double* __restrict__ scalars, int use_scalars
#define ADAM_MASTER_ARGS \
    p, g, m, v, p16, n, lr, beta1, beta2, eps, weight_decay, decoupled, scale, found, taken, scalars, use_scalars

#ifdef CNN_FP16
template <typename T>
__device__ __forceinline__ void adam_update_master_body(ADAM_MASTER_PARAMS(T)) {
    if (found[0]) return;  // skipped: p, m, v, p16 as they are
    if (use_scalars) lr = scalars[0];
    const double t = (double)taken[0] + 1.0;
    const double bc1 = 1.0 - pow(beta1, t), bc2d = 1.0 - pow(beta2, t);
    const T step_size = (T)(lr / bc1), bc2 = (T)bc2d, decay = (T)(1.0 - lr * weight_decay);
    const T b1 = (T)beta1, omb1 = (T)(1.0 - beta1), b2 = (T)beta2, omb2 = (T)(1.0 - beta2), wd = (T)weight_decay;
    const T inv_scale = T(1) / scale[0];
    const cnn_adam_consts<T> k = {b1, omb1, b2, omb2, eps, wd, decay, step_size, bc2, decoupled};
    CNN_GRID_STRIDE_LOOP(i, n) {
        const T q = cnn_adam_element(p[i], g[i] * inv_scale, m + i, v + i, k);
        p[i] = q;
        p16[i] = __float2half_rn((float)q);
    }
}
extern "C" __global__ void adam_update_master_f16(ADAM_MASTER_PARAMS(float)) {
    adam_update_master_body<float>(ADAM_MASTER_ARGS);
}
#endif

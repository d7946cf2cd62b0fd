// scaler.cu: dynamic loss scaling on the device, and the optimizer step of float16 training
// (float32 master weights, a float16 copy for the forward), with no host sync.
//
// A float16 training step multiplies the loss's gradient by `scale` (so small gradients survive
// float16), and before the update:
//   found_inf:          found[0] = 1 if any gradient value is inf or NaN (one launch over the
//                       flat gradient buffer; every writer stores the same 1, so no atomics and no
//                       race in the result; found[0] is 0 on entry, reset by loss_scale_update)
//   sgd_update_master:  unless found[0]: g = grad * (1 / scale[0]) (the unscaled gradient), the SGD
//                       step of optim.cu's sgd_update on the float32 master weights p, and
//                       p16 = p rounded to float16 (the copy the forward reads); if found[0] the
//                       step is skipped: p, buf and p16 stay as they are
//   adam_update_master: the same for Adam / AdamW (optim.cu's adam_update), its bias corrections
//                       from t = taken[0] + 1, the steps not skipped (as torch's Adam counts them)
//   loss_scale_update:  torch.amp.GradScaler's rule (one thread): if found[0], scale *= backoff
//                       and the count of clean steps restarts; else taken[0] += 1 and after
//                       `interval` clean steps in a row scale *= growth (kept only if finite) and the
//                       count restarts; then found[0] = 0 for the next step
// scale (float32), tracker and found (int32) are one-element device arrays at fixed addresses,
// so a CUDA graph replays the three launches step after step (cnn_gpu/precision.py LossScaler).
//
// The master step has no first-step branch: the momentum buffer starts at zeros, and
// momentum * 0 + d = d, the value sgd_update's first step stores (a skipped first step then
// needs no host bookkeeping).
#include "common.cuh"

// ---- found[0] = 1 where a value of g is not finite ------------------------------------------
#define FOUND_INF_PARAMS(T) const T* __restrict__ g, long long n, int* __restrict__ found
#define FOUND_INF_ARGS g, n, found

template <typename T>
__device__ __forceinline__ void found_inf_body(FOUND_INF_PARAMS(T)) {
    CNN_GRID_STRIDE_LOOP(i, n) {
        const T v = g[i];
        if (v - v != T(0)) found[0] = 1;  // inf - inf and NaN - NaN are NaN; finite - itself is 0
    }
}
CNN_ENTRY_POINTS(found_inf, FOUND_INF_PARAMS, FOUND_INF_ARGS)

// ---- the scale's update (one thread) ----------------------------------------------------------
#define SCALE_UPDATE_PARAMS(T)                                                                                 \
    T* __restrict__ scale, int* __restrict__ tracker, int* __restrict__ found, int* __restrict__ taken, T growth, \
    T backoff, int interval
#define SCALE_UPDATE_ARGS scale, tracker, found, taken, growth, backoff, interval

template <typename T>
__device__ __forceinline__ void loss_scale_update_body(SCALE_UPDATE_PARAMS(T)) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    if (found[0]) {
        scale[0] = scale[0] * backoff;
        tracker[0] = 0;
    } else {
        taken[0] = taken[0] + 1;  // the steps the optimizer took (Adam's t)
        const int clean = tracker[0] + 1;
        if (clean >= interval) {
            const T grown = scale[0] * growth;
            if (grown - grown == T(0)) scale[0] = grown;  // finite
            tracker[0] = 0;
        } else {
            tracker[0] = clean;
        }
    }
    found[0] = 0;
}
CNN_ENTRY_POINTS(loss_scale_update, SCALE_UPDATE_PARAMS, SCALE_UPDATE_ARGS)

// ---- SGD on float32 master weights, the float16 copy written, skipped on overflow -------------
//   d = g / scale + weight_decay * p;  buf = momentum * buf + d;  d = d + momentum * buf (Nesterov)
//   or buf;  p = p - lr * d;  p16 = half(p)          (momentum == 0: d as it is, buf not touched)
// T is the master weights' type (float); lr from scalars[0] with use_scalars (see optim.cu).
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
        const T pi = p[i];
        T d = g[i] * inv_scale;
        if (weight_decay != T(0)) d = d + weight_decay * pi;
        if (momentum != T(0)) {
            const T b = momentum * buf[i] + d;
            buf[i] = b;
            d = nesterov ? d + momentum * b : b;
        }
        const T q = pi - lr * d;
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
// optim.cu's adam_update on g / scale, with the step's scalars formed here in double precision, as
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
    CNN_GRID_STRIDE_LOOP(i, n) {
        T pi = p[i];
        T gi = g[i] * inv_scale;
        if (wd != T(0)) {
            if (decoupled) {
                pi = pi * decay;
            } else {
                gi = gi + wd * pi;
            }
        }
        const T mi = b1 * m[i] + omb1 * gi;
        const T vi = b2 * v[i] + omb2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        const T denom = cnn_sqrt(vi / bc2) + eps;
        const T q = pi - step_size * mi / denom;
        p[i] = q;
        p16[i] = __float2half_rn((float)q);
    }
}
extern "C" __global__ void adam_update_master_f16(ADAM_MASTER_PARAMS(float)) {
    adam_update_master_body<float>(ADAM_MASTER_ARGS);
}
#endif

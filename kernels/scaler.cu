// scaler.cu: dynamic loss scaling on the device, with no host sync (the optimizer step of float16
// training, on float32 master weights, is optim.cu's sgd_update_master / adam_update_master).
//
// A float16 training step multiplies the loss's gradient by `scale` (so small gradients survive
// float16), and before the update:
//   found_inf:          found[0] = 1 if any gradient value is inf or NaN (one launch over the
//                       flat gradient buffer; every writer stores the same 1, so no atomics and no
//                       race in the result; found[0] is 0 on entry, reset by loss_scale_update)
//   optim.cu's sgd_update_master / adam_update_master: unless found[0], the update on the float32
//                       master weights from grad * (1 / scale[0]) and their float16 copy; Adam's
//                       bias corrections from t = taken[0] + 1, the steps not skipped
//   loss_scale_update:  torch.amp.GradScaler's rule (one thread): if found[0], scale *= backoff
//                       and the count of clean steps restarts; else taken[0] += 1 and after
//                       `interval` clean steps in a row scale *= growth (kept only if finite) and the
//                       count restarts; then found[0] = 0 for the next step
// scale (float32), tracker and found (int32) are one-element device arrays at fixed addresses,
// so a CUDA graph replays the three launches step after step (cnn_gpu/precision.py LossScaler).
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

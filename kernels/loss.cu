// loss.cu: softmax cross-entropy with integer class labels, forward and backward fused.
//
// logits z (N, K), labels (N,) int64 in [0, K) (the dtype labels usually have: no cast per step, and
// no wrap-around of a large label into range), label smoothing eps as on = 1 - eps, off = eps/K:
//   m = max_k z[n, k]                      (stable: every exp argument is <= 0)
//   lse = log(sum_k exp(z[n, k] - m))
//   logp[n, k] = (z[n, k] - m) - lse
//   loss[n] = -logp[n, label[n]]                                         (off == 0)
//           = -(on * logp[n, label[n]] + off * sum_k logp[n, k])         (off != 0)
//   dlogits[n, k] = (exp(logp[n, k]) - t[n, k]) * inv_n,   inv_n = 1/N
//   t[n, k] = [k == label[n]] * on + off      (the smoothed one-hot; with eps = 0, the one-hot)
// Same formulas as softmax_cross_entropy in cnn_gpu/functional/reference.py. A label outside [0, K) gives
// NaN in that sample's loss and dlogits row (never an out-of-bounds read), and with `check` sets the
// sticky flag bad[0] = 1 (the range check on the device: every writer writes the same 1, so the
// result does not depend on their order; the host reads it when it chooses, CrossEntropyLoss.check_labels).
// scaled_sum then reduces the per-sample losses to the batch mean in one block.
// float16 logits (softmax_cross_entropy_f16): everything computed in float, the per-sample losses
// (so the batch loss, scaled_sum_f32) float32, dlogits rounded to float16 once. With use_grad_scale,
// dlogits are also multiplied by grad_scale[0] (float16 training's loss scale, in device memory, a
// power of 2: exact unless it overflows to inf, which the found-inf check then sees).
#include "common.cuh"

// ---- one block per row (grid-stride over rows), deterministic block reductions -------
#define SCE_PARAMS(T)                                                                                     \
    const T* __restrict__ logits, const long long* __restrict__ labels, CNN_ACC(T)* __restrict__ loss,    \
    T* __restrict__ dlogits, long long* __restrict__ bad, int N, int K, CNN_ACC(T) inv_n, CNN_ACC(T) on,   \
    CNN_ACC(T) off, int check, const CNN_ACC(T)* __restrict__ grad_scale, int use_grad_scale
#define SCE_ARGS logits, labels, loss, dlogits, bad, N, K, inv_n, on, off, check, grad_scale, use_grad_scale

template <typename T>
__device__ __forceinline__ void softmax_cross_entropy_body(SCE_PARAMS(T)) {
    typedef CNN_ACC(T) A;  // float for float16 logits: the softmax, the loss and its sums in float32
    __shared__ A sh[CNN_MAX_BLOCK];
    const A gs = use_grad_scale ? grad_scale[0] : A(1);  // the loss scale (a power of 2), or 1
    for (int n = blockIdx.x; n < N; n += gridDim.x) {  // uniform across the block
        const T* z = logits + (long long)n * K;
        T* d = dlogits + (long long)n * K;
        A m = -cnn_limits<A>::inf();
        for (int k = threadIdx.x; k < K; k += blockDim.x) m = cnn_max_nan(m, cnn_ld(z[k]));
        m = cnn_block_max(m, sh);
        A s = A(0);
        for (int k = threadIdx.x; k < K; k += blockDim.x) s += cnn_exp(cnn_ld(z[k]) - m);
        s = cnn_block_sum(s, sh);
        const A lse = cnn_log(s);
        A slp = A(0);  // sum_k logp[n, k], needed with smoothing only (off is uniform across the grid)
        if (off != A(0)) {
            for (int k = threadIdx.x; k < K; k += blockDim.x) slp += (cnn_ld(z[k]) - m) - lse;
            slp = cnn_block_sum(slp, sh);
        }
        const long long label = labels[n];
        const bool ok = label >= 0 && label < K;
        const A hit = on + off;  // t at the label
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            const A p = cnn_exp((cnn_ld(z[k]) - m) - lse);
            A g = ok ? (p - (k == label ? hit : off)) * inv_n : cnn_limits<A>::nan();
            if (use_grad_scale) g = g * gs;
            d[k] = cnn_st<T>(g);
        }
        if (threadIdx.x == 0) {
            if (check && !ok) bad[0] = 1;
            const A lp = ok ? (cnn_ld(z[label]) - m) - lse : cnn_limits<A>::nan();
            loss[n] = off != A(0) ? -(on * lp + off * slp) : -lp;
        }
    }
}
CNN_ENTRY_POINTS_FP16(softmax_cross_entropy, SCE_PARAMS, SCE_ARGS)

// ---- out[0] = scale * sum(x): single-block deterministic reduction ---------------------
// Launch with one block (further blocks return at once). Thread t sums x[t],
// x[t + blockDim], ... in order, then the block tree-reduces.
#define SCALED_SUM_PARAMS(T) const T* __restrict__ x, T* __restrict__ out, long long n, T scale
#define SCALED_SUM_ARGS x, out, n, scale

template <typename T>
__device__ __forceinline__ void scaled_sum_body(SCALED_SUM_PARAMS(T)) {
    __shared__ T sh[CNN_MAX_BLOCK];
    if (blockIdx.x != 0) return;  // uniform across the block
    T part = T(0);
    for (long long i = threadIdx.x; i < n; i += blockDim.x) part += x[i];
    const T total = cnn_block_sum(part, sh);
    if (threadIdx.x == 0) out[0] = total * scale;
}
CNN_ENTRY_POINTS(scaled_sum, SCALED_SUM_PARAMS, SCALED_SUM_ARGS)

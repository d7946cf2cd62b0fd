// batchnorm.cu: batch normalisation over the channels of x (N, C, P), NCHW: P = H*W, or 1 for (N, C).
//
// One block per channel c (grid-stride over c); thread t handles j = t, t + blockDim, ... of the
// channel's M = N*P values j = n*P + p. The per-channel sums are deterministic block reductions
// (cnn_block_sum: a fixed tree order, no atomics), so the results depend only on the block size.
//
//   batch_norm_forward   with batch statistics: mean = sum(x) / M, var = sum((x - mean)^2) / M (two
//                        passes), and with update_running the running statistics in place:
//                        rm = rm*keep + m*mean, rv = rv*keep + m_unbiased*var  (m_unbiased = m*M/(M-1));
//                        else mean, var = rm, rv. invstd = 1 / sqrt(var + eps); then, fused in the same
//                        block, y = (x - mean) * invstd (* gamma) (+ beta). mean and invstd go to
//                        mean_out / invstd_out for the backward. relu: y = max(y, 0) too (a NaN stays NaN), the
//                        ReLU that follows in nn.Sequential fused.
//   batch_norm_backward  (relu: dy * (y > 0) in place of dy throughout, y the forward's output)
//                        xhat = (x - mean) * invstd; dbeta = sum(dy), dgamma = sum(dy * xhat) (two block
//                        sums in one pass), then, fused: g = dy (* gamma),
//                        dx = (g - (sum(g) + xhat * sum(g xhat)) / M) * invstd   (batch statistics)
//                        dx = g * invstd                                          (fixed statistics)
// The operation order is the reference's (cnn_gpu/functional/reference.py).
#include "common.cuh"

__device__ __forceinline__ long long cnn_bn_offset(long long j, int c, int C, int P) {
    const long long n = j / P;
    return (n * C + c) * P + (j - n * P);  // x[n, c, p]
}

#define BN_FWD_PARAMS(T)                                                                         \
    const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ gamma, const T* __restrict__ beta, \
    T* running_mean, T* running_var, T* __restrict__ mean_out, T* __restrict__ invstd_out,         \
    int N, int C, int P, int has_gamma, int has_beta, int batch_stats, int update_running, int relu, \
    T keep, T m, T m_unbiased, T eps
#define BN_FWD_ARGS \
    x, y, gamma, beta, running_mean, running_var, mean_out, invstd_out, N, C, P, has_gamma, has_beta, \
    batch_stats, update_running, relu, keep, m, m_unbiased, eps

template <typename T>
__device__ __forceinline__ void batch_norm_forward_body(BN_FWD_PARAMS(T)) {
    __shared__ T sh[CNN_MAX_BLOCK];
    const long long M = (long long)N * P;
    for (int c = blockIdx.x; c < C; c += gridDim.x) {  // uniform across the block
        T mean, var;
        if (batch_stats) {
            T part = T(0);
            for (long long j = threadIdx.x; j < M; j += blockDim.x) part += x[cnn_bn_offset(j, c, C, P)];
            mean = cnn_block_sum(part, sh) / T(M);
            part = T(0);
            for (long long j = threadIdx.x; j < M; j += blockDim.x) {
                const T d = x[cnn_bn_offset(j, c, C, P)] - mean;
                part += d * d;
            }
            var = cnn_block_sum(part, sh) / T(M);
        } else {
            mean = running_mean[c];
            var = running_var[c];
        }
        const T invstd = T(1) / cnn_sqrt(var + eps);
        if (threadIdx.x == 0) {
            mean_out[c] = mean;
            invstd_out[c] = invstd;
            if (update_running) {
                running_mean[c] = running_mean[c] * keep + m * mean;
                running_var[c] = running_var[c] * keep + m_unbiased * var;
            }
        }
        const T g = has_gamma ? gamma[c] : T(1);
        const T b = has_beta ? beta[c] : T(0);
        for (long long j = threadIdx.x; j < M; j += blockDim.x) {
            const long long o = cnn_bn_offset(j, c, C, P);
            T v = (x[o] - mean) * invstd;
            if (has_gamma) v = v * g;
            if (has_beta) v = v + b;
            y[o] = relu ? cnn_relu(v) : v;
        }
    }
}
CNN_ENTRY_POINTS(batch_norm_forward, BN_FWD_PARAMS, BN_FWD_ARGS)

#define BN_BWD_PARAMS(T)                                                                            \
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gamma, \
    const T* __restrict__ mean, const T* __restrict__ invstd, T* __restrict__ dx,                   \
    T* __restrict__ dgamma, T* __restrict__ dbeta, int N, int C, int P, int has_gamma, int has_beta, \
    int batch_stats, int relu
#define BN_BWD_ARGS dy, x, y, gamma, mean, invstd, dx, dgamma, dbeta, N, C, P, has_gamma, has_beta, batch_stats, relu

// dy, or dy * relu'(y) with the fused ReLU (a product: a NaN in dy stays NaN, as in the reference)
template <typename T>
__device__ __forceinline__ T cnn_bn_delta(const T* dy, const T* y, long long o, int relu) {
    return relu ? cnn_relu_grad(dy[o], y[o]) : dy[o];
}

template <typename T>
__device__ __forceinline__ void batch_norm_backward_body(BN_BWD_PARAMS(T)) {
    __shared__ T sh[CNN_MAX_BLOCK];
    const long long M = (long long)N * P;
    for (int c = blockIdx.x; c < C; c += gridDim.x) {  // uniform across the block
        const T mu = mean[c], s = invstd[c];
        const T g = has_gamma ? gamma[c] : T(1);
        T part_dy = T(0), part_dyx = T(0);
        for (long long j = threadIdx.x; j < M; j += blockDim.x) {
            const long long o = cnn_bn_offset(j, c, C, P);
            const T d = cnn_bn_delta(dy, y, o, relu);
            part_dy += d;
            part_dyx += d * ((x[o] - mu) * s);
        }
        const T sum_dy = cnn_block_sum(part_dy, sh);
        const T sum_dyx = cnn_block_sum(part_dyx, sh);
        if (threadIdx.x == 0) {
            if (has_beta) dbeta[c] = sum_dy;
            if (has_gamma) dgamma[c] = sum_dyx;
        }
        const T sum_g = has_gamma ? sum_dy * g : sum_dy;
        const T sum_gx = has_gamma ? sum_dyx * g : sum_dyx;
        const T inv_m = T(1) / T(M);
        for (long long j = threadIdx.x; j < M; j += blockDim.x) {
            const long long o = cnn_bn_offset(j, c, C, P);
            const T d = cnn_bn_delta(dy, y, o, relu);
            const T gj = has_gamma ? d * g : d;
            if (batch_stats) {
                const T xhat = (x[o] - mu) * s;
                dx[o] = (gj - (sum_g + xhat * sum_gx) * inv_m) * s;
            } else {
                dx[o] = gj * s;
            }
        }
    }
}
CNN_ENTRY_POINTS(batch_norm_backward, BN_BWD_PARAMS, BN_BWD_ARGS)

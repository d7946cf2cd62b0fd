// batchnorm.cu: batch normalisation over the channels of x (N, C, P), NCHW: P = H*W, or 1 for (N, C).
//
// Channel c's M = N*P values j = n*P + p are cut into S segments of L = ceil(M / S) values; block
// b = c*S + s (grid-stride over the C*S blocks) handles segment s of channel c, thread t its values
// j0 + t, j0 + t + blockDim, ... (cnn_bn_segment walks (n, p) without a division per value). So a
// ResNet's 16-64 channels keep the whole GPU busy (the launcher picks S from the shape alone). A
// per-channel sum is two fixed-order steps, no atomics: each block's sum of its segment
// (cnn_block_sum) into part[c*S + s], then, in the next launch, every block of channel c sums
// part[c*S : c*S + S] the same way (cnn_bn_channel_total); the results depend only on S and the
// block size, never on the grid or the order blocks run in.
//
//   forward, batch statistics (three launches):
//     batch_norm_sum       part_sum[c, s] = sum over the segment of x
//     batch_norm_sq        mean = sum_s part_sum / M;  part_sq[c, s] = sum over the segment of (x - mean)^2
//     batch_norm_forward   var = sum_s part_sq / M (two passes, as the reference); invstd = 1/sqrt(var + eps);
//                          y = (x - mean) * invstd (* gamma) (+ beta), relu: max(y, 0) (a NaN stays NaN);
//                          the blocks of segment 0 write mean_out, invstd_out and, with update_running,
//                          rm = rm*keep + m*mean, rv = rv*keep + m_unbiased*var (m_unbiased = m*M/(M-1))
//                          and, with count_batch, num_batches_tracked += 1 (the layer's int64 counter)
//   forward, fixed statistics: batch_norm_forward alone, mean, var = rm, rv
//   backward (two launches; relu: delta = dy * (y > 0) in place of dy throughout, y the forward's output)
//     batch_norm_backward_sums  part_dy[c, s] = sum(delta), part_dyx[c, s] = sum(delta * xhat),
//                               xhat = (x - mean) * invstd
//     batch_norm_backward       dbeta = sum(delta), dgamma = sum(delta xhat) (segment 0's blocks; with
//                               `accumulate` added into dbeta and dgamma: Parameter.grad), then
//                               g = delta (* gamma), dx = (g - (sum(g) + xhat * sum(g xhat)) / M) * invstd
//                               (batch statistics), or dx = g * invstd (fixed statistics)
// The operation order is the reference's (cnn_gpu/functional/reference.py).
// Float16 storage (the _f16 entry points, kernels/common.cuh): x, y, dy, dx, gamma and beta are T,
// everything statistical is CNN_ACC(T) (float for __half): the partial sums, mean / invstd, the
// running statistics, dgamma / dbeta (float32 Parameter.grad) and the scalars; the arithmetic is
// CNN_ACC(T), each value read with cnn_ld and rounded once where y or dx is stored (cnn_st).
#include "common.cuh"

// f(o) for this thread's values of segment s (of S) of channel c: o = (n*C + c)*P + p, the offset of
// x[n, c, p] for j = n*P + p = j0 + threadIdx.x, j0 + threadIdx.x + blockDim.x, ... < j1.
template <typename F>
__device__ __forceinline__ void cnn_bn_segment(int c, int s, int S, int C, int P, long long M, F f) {
    const long long L = (M + S - 1) / S, j0 = (long long)s * L, j1 = j0 + L < M ? j0 + L : M;
    long long j = j0 + threadIdx.x;
    long long n = j / P;  // once per thread; then (n, p) advance by (blockDim / P, blockDim % P)
    int p = (int)(j - n * P);
    const long long dn = blockDim.x / P;
    const int dp = (int)(blockDim.x % P);
    for (; j < j1; j += blockDim.x) {
        f((n * C + c) * P + p);
        p += dp;
        n += dn;
        if (p >= P) {
            p -= P;
            ++n;
        }
    }
}

// f(c, s) for every (channel, segment) block b = c*S + s of this thread block: b = blockIdx.x,
// blockIdx.x + gridDim.x, ... < C*S (uniform across the block, so f may synchronise it)
template <typename F>
__device__ __forceinline__ void cnn_bn_blocks(int C, int S, F f) {
    for (long long b = blockIdx.x; b < (long long)C * S; b += gridDim.x) f((int)(b / S), (int)(b % S));
}

// sum_s part[c*S + s], in the same fixed order in every block (every thread must call it)
template <typename T>
__device__ __forceinline__ T cnn_bn_channel_total(const T* part, int c, int S, T* sh) {
    T v = T(0);
    for (int i = threadIdx.x; i < S; i += blockDim.x) v += part[(long long)c * S + i];
    return cnn_block_sum(v, sh);
}

#define BN_SUM_PARAMS(T) const T* __restrict__ x, CNN_ACC(T)* __restrict__ part_sum, int N, int C, int P, int S
#define BN_SUM_ARGS x, part_sum, N, C, P, S

template <typename T>
__device__ __forceinline__ void batch_norm_sum_body(BN_SUM_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    __shared__ A sh[CNN_MAX_BLOCK];
    const long long M = (long long)N * P;
    cnn_bn_blocks(C, S, [&](int c, int s) {  // segment s of channel c
        A part = A(0);
        cnn_bn_segment(c, s, S, C, P, M, [&](long long o) { part += cnn_ld(x[o]); });
        part = cnn_block_sum(part, sh);
        if (threadIdx.x == 0) part_sum[(long long)c * S + s] = part;
    });
}
CNN_ENTRY_POINTS_FP16(batch_norm_sum, BN_SUM_PARAMS, BN_SUM_ARGS)

#define BN_SQ_PARAMS(T)                                                                                 \
    const T* __restrict__ x, const CNN_ACC(T)* __restrict__ part_sum, CNN_ACC(T)* __restrict__ part_sq, int N, \
    int C, int P, int S
#define BN_SQ_ARGS x, part_sum, part_sq, N, C, P, S

template <typename T>
__device__ __forceinline__ void batch_norm_sq_body(BN_SQ_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    __shared__ A sh[CNN_MAX_BLOCK];
    const long long M = (long long)N * P;
    cnn_bn_blocks(C, S, [&](int c, int s) {  // segment s of channel c
        const A mean = cnn_bn_channel_total(part_sum, c, S, sh) / A(M);
        A part = A(0);
        cnn_bn_segment(c, s, S, C, P, M, [&](long long o) {
            const A d = cnn_ld(x[o]) - mean;
            part += d * d;
        });
        part = cnn_block_sum(part, sh);
        if (threadIdx.x == 0) part_sq[(long long)c * S + s] = part;
    });
}
CNN_ENTRY_POINTS_FP16(batch_norm_sq, BN_SQ_PARAMS, BN_SQ_ARGS)

// (x, y, gamma, beta: T; the statistics, running statistics, partial sums and scalars: CNN_ACC(T))
#define BN_FWD_PARAMS(T)                                                                                  \
    const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ gamma, const T* __restrict__ beta,  \
    const CNN_ACC(T)* __restrict__ part_sum, const CNN_ACC(T)* __restrict__ part_sq,                      \
    CNN_ACC(T)* running_mean, CNN_ACC(T)* running_var, CNN_ACC(T)* __restrict__ mean_out,                 \
    CNN_ACC(T)* __restrict__ invstd_out, long long* num_batches_tracked, int N, int C, int P, int S,       \
    int has_gamma, int has_beta, int batch_stats, int update_running, int count_batch, int relu,          \
    CNN_ACC(T) keep, CNN_ACC(T) m, CNN_ACC(T) m_unbiased, CNN_ACC(T) eps
#define BN_FWD_ARGS                                                                                       \
    x, y, gamma, beta, part_sum, part_sq, running_mean, running_var, mean_out, invstd_out,                \
    num_batches_tracked, N, C, P, S, has_gamma, has_beta, batch_stats, update_running, count_batch, relu, \
    keep, m, m_unbiased, eps

template <typename T>
__device__ __forceinline__ void batch_norm_forward_body(BN_FWD_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    __shared__ A sh[CNN_MAX_BLOCK];
    const long long M = (long long)N * P;
    cnn_bn_blocks(C, S, [&](int c, int s) {  // segment s of channel c
        A mean, var;
        if (batch_stats) {
            mean = cnn_bn_channel_total(part_sum, c, S, sh) / A(M);
            var = cnn_bn_channel_total(part_sq, c, S, sh) / A(M);
        } else {
            mean = running_mean[c];
            var = running_var[c];
        }
        const A invstd = A(1) / cnn_sqrt(var + eps);
        if (s == 0 && threadIdx.x == 0) {
            mean_out[c] = mean;
            invstd_out[c] = invstd;
            if (update_running) {
                running_mean[c] = running_mean[c] * keep + m * mean;
                running_var[c] = running_var[c] * keep + m_unbiased * var;
            }
            if (count_batch && c == 0) num_batches_tracked[0] += 1;  // one block has (c, s) = (0, 0)
        }
        const A g = has_gamma ? cnn_ld(gamma[c]) : A(1);
        const A bt = has_beta ? cnn_ld(beta[c]) : A(0);
        cnn_bn_segment(c, s, S, C, P, M, [&](long long o) {
            A v = (cnn_ld(x[o]) - mean) * invstd;
            if (has_gamma) v = v * g;
            if (has_beta) v = v + bt;
            y[o] = cnn_st<T>(relu ? cnn_relu(v) : v);
        });
    });
}
CNN_ENTRY_POINTS_FP16(batch_norm_forward, BN_FWD_PARAMS, BN_FWD_ARGS)

// dy, or dy * relu'(y) with the fused ReLU (a product: a NaN in dy stays NaN, as in the reference)
template <typename T>
__device__ __forceinline__ CNN_ACC(T) cnn_bn_delta(const T* dy, const T* y, long long o, int relu) {
    return relu ? cnn_relu_grad(cnn_ld(dy[o]), cnn_ld(y[o])) : cnn_ld(dy[o]);
}

#define BN_BSUM_PARAMS(T)                                                                                 \
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,                           \
    const CNN_ACC(T)* __restrict__ mean, const CNN_ACC(T)* __restrict__ invstd,                           \
    CNN_ACC(T)* __restrict__ part_dy, CNN_ACC(T)* __restrict__ part_dyx, int N, int C, int P, int S, int relu
#define BN_BSUM_ARGS dy, x, y, mean, invstd, part_dy, part_dyx, N, C, P, S, relu

template <typename T>
__device__ __forceinline__ void batch_norm_backward_sums_body(BN_BSUM_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    __shared__ A sh[CNN_MAX_BLOCK];
    const long long M = (long long)N * P;
    cnn_bn_blocks(C, S, [&](int c, int s) {  // segment s of channel c
        const A mu = mean[c], is = invstd[c];
        A sum_dy = A(0), sum_dyx = A(0);
        cnn_bn_segment(c, s, S, C, P, M, [&](long long o) {
            const A d = cnn_bn_delta(dy, y, o, relu);
            sum_dy += d;
            sum_dyx += d * ((cnn_ld(x[o]) - mu) * is);
        });
        sum_dy = cnn_block_sum(sum_dy, sh);
        sum_dyx = cnn_block_sum(sum_dyx, sh);
        if (threadIdx.x == 0) {
            part_dy[(long long)c * S + s] = sum_dy;
            part_dyx[(long long)c * S + s] = sum_dyx;
        }
    });
}
CNN_ENTRY_POINTS_FP16(batch_norm_backward_sums, BN_BSUM_PARAMS, BN_BSUM_ARGS)

// (dy, x, y, gamma, dx: T; the statistics, partial sums and dgamma, dbeta: CNN_ACC(T), float32
// Parameter.grad arrays in float16 training)
#define BN_BWD_PARAMS(T)                                                                                  \
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gamma, \
    const CNN_ACC(T)* __restrict__ mean, const CNN_ACC(T)* __restrict__ invstd,                           \
    const CNN_ACC(T)* __restrict__ part_dy, const CNN_ACC(T)* __restrict__ part_dyx, T* __restrict__ dx,  \
    CNN_ACC(T)* __restrict__ dgamma, CNN_ACC(T)* __restrict__ dbeta, int N, int C, int P, int S,          \
    int has_gamma, int has_beta, int batch_stats, int relu, int accumulate
#define BN_BWD_ARGS                                                                                       \
    dy, x, y, gamma, mean, invstd, part_dy, part_dyx, dx, dgamma, dbeta, N, C, P, S, has_gamma, has_beta, \
    batch_stats, relu, accumulate

template <typename T>
__device__ __forceinline__ void batch_norm_backward_body(BN_BWD_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    __shared__ A sh[CNN_MAX_BLOCK];
    const long long M = (long long)N * P;
    cnn_bn_blocks(C, S, [&](int c, int s) {  // segment s of channel c
        const A mu = mean[c], is = invstd[c];
        const A g = has_gamma ? cnn_ld(gamma[c]) : A(1);
        const A sum_dy = cnn_bn_channel_total(part_dy, c, S, sh);
        const A sum_dyx = cnn_bn_channel_total(part_dyx, c, S, sh);
        if (s == 0 && threadIdx.x == 0) {
            if (has_beta) dbeta[c] = accumulate ? dbeta[c] + sum_dy : sum_dy;
            if (has_gamma) dgamma[c] = accumulate ? dgamma[c] + sum_dyx : sum_dyx;
        }
        const A sum_g = has_gamma ? sum_dy * g : sum_dy;
        const A sum_gx = has_gamma ? sum_dyx * g : sum_dyx;
        const A inv_m = A(1) / A(M);
        cnn_bn_segment(c, s, S, C, P, M, [&](long long o) {
            const A d = cnn_bn_delta(dy, y, o, relu);
            const A gj = has_gamma ? d * g : d;
            if (batch_stats) {
                const A xhat = (cnn_ld(x[o]) - mu) * is;
                dx[o] = cnn_st<T>((gj - (sum_g + xhat * sum_gx) * inv_m) * is);
            } else {
                dx[o] = cnn_st<T>(gj * is);
            }
        });
    });
}
CNN_ENTRY_POINTS_FP16(batch_norm_backward, BN_BWD_PARAMS, BN_BWD_ARGS)

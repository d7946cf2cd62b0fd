// epilogue.cu: what runs around a layer's GEMMs: the bias and a fused ReLU on the way
// forward, the ReLU's mask and the bias gradient on the way back.
//
// A layer's output y is (N, F, P) NCHW: P = OH*OW for a convolution, 1 for a fully connected
// layer. A convolution's GEMMs work on the channel-major (F, N*P) form (cnn_gpu/cuda/ops.py),
// so these kernels also move between the two forms while they do their arithmetic: the
// flag `cm` says the GEMM side (src forward, dst backward) is (F, N*P), else (N, F, P).
//
//   bias_act_forward:        y[n, f, p] = act(src[f, n*P + p] or src[n, f, p] + b[f])
//   act_backward_bias_grad:  delta = dy * (y > 0) with the ReLU (a product, as in the
//                            reference: a NaN in dy stays NaN), else dy, written to dst in
//                            the GEMM's form; db[f] = the sum of delta over n and p, or with
//                            `accumulate` db[f] += that sum (a Parameter.grad, or the chunks
//                            of one batch: no separate launch to add them)
//
//   add_act_forward:         y = a + b, relu(a + b) with relu (a residual block's sum and the ReLU
//                            after it, one pass)
//   relu_backward:           dx = dy * (y > 0) (a product: a NaN in dy stays NaN)
//
// The bias gradient is a deterministic block reduction: one block per filter f (grid-stride
// over f), each thread sums a fixed subset, then the fixed-order shared-memory tree
// (cnn_block_sum). No atomics: the result depends only on the launch's block size.
#include "common.cuh"

// offset of element (n, f, p) in the (F, N*P) or the (N, F, P) form
__device__ __forceinline__ long long cnn_nfp_offset(long long n, int f, long long p, int N, int F, long long P, int cm) {
    return cm ? ((long long)f * N + n) * P + p : (n * F + f) * P + p;
}

// ---- y = act(src + b): one thread per element of y ----------------------------------------
// With cm == 0 src may be y itself (in place). has_bias == 0: b is not read.
#define BIAS_ACT_FWD_PARAMS(T) \
    const T* src, T* y, const T* __restrict__ b, int N, int F, int P, int cm, int has_bias, int relu
#define BIAS_ACT_FWD_ARGS src, y, b, N, F, P, cm, has_bias, relu

template <typename T>
__device__ __forceinline__ void bias_act_forward_body(BIAS_ACT_FWD_PARAMS(T)) {
    const long long total = (long long)N * F * P;
    CNN_GRID_STRIDE_LOOP(i, total) {  // i walks y (N, F, P) in memory order
        const long long p = i % P;
        const int f = (int)((i / P) % F);
        const long long n = i / ((long long)F * P);
        T v = src[cnn_nfp_offset(n, f, p, N, F, P, cm)];
        if (has_bias) v = v + b[f];
        y[i] = relu ? cnn_relu(v) : v;
    }
}
CNN_ENTRY_POINTS(bias_act_forward, BIAS_ACT_FWD_PARAMS, BIAS_ACT_FWD_ARGS)

// ---- delta = dy (* relu'(y)) into dst, db = its sums over n and p: one block per f --------
// Thread t handles j = t, t + blockDim, ... of the flattened (n, p) index j = n*P + p.
// relu == 0: y is not read; has_bias == 0: db is not written.
#define ACT_BWD_BIAS_PARAMS(T)                                                              \
    const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dst, T* __restrict__ db, \
    int N, int F, int P, int cm, int has_bias, int relu, int accumulate
#define ACT_BWD_BIAS_ARGS dy, y, dst, db, N, F, P, cm, has_bias, relu, accumulate

template <typename T>
__device__ __forceinline__ void act_backward_bias_grad_body(ACT_BWD_BIAS_PARAMS(T)) {
    __shared__ T sh[CNN_MAX_BLOCK];
    const long long NP = (long long)N * P;
    for (int f = blockIdx.x; f < F; f += gridDim.x) {  // uniform across the block
        T part = T(0);
        for (long long j = threadIdx.x; j < NP; j += blockDim.x) {
            const long long n = j / P;
            const long long p = j - n * P;
            const long long src = (n * F + f) * P + p;  // dy and y are (N, F, P)
            const T g = relu ? cnn_relu_grad(dy[src], y[src]) : dy[src];
            dst[cnn_nfp_offset(n, f, p, N, F, P, cm)] = g;
            part += g;
        }
        const T total = cnn_block_sum(part, sh);
        if (has_bias && threadIdx.x == 0) db[f] = accumulate ? db[f] + total : total;
    }
}
CNN_ENTRY_POINTS(act_backward_bias_grad, ACT_BWD_BIAS_PARAMS, ACT_BWD_BIAS_ARGS)

// ---- y = a + b (relu: max(., 0)): one thread per element ----------------------------------
#define ADD_ACT_PARAMS(T) const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, long long n, int relu
#define ADD_ACT_ARGS a, b, y, n, relu

template <typename T>
__device__ __forceinline__ void add_act_forward_body(ADD_ACT_PARAMS(T)) {
    CNN_GRID_STRIDE_LOOP(i, n) {
        const T v = a[i] + b[i];
        y[i] = relu ? cnn_relu(v) : v;
    }
}
CNN_ENTRY_POINTS(add_act_forward, ADD_ACT_PARAMS, ADD_ACT_ARGS)

// ---- dx = dy * relu'(y): one thread per element -------------------------------------------
#define RELU_BWD_PARAMS(T) const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, long long n
#define RELU_BWD_ARGS dy, y, dx, n

template <typename T>
__device__ __forceinline__ void relu_backward_body(RELU_BWD_PARAMS(T)) {
    CNN_GRID_STRIDE_LOOP(i, n) { dx[i] = cnn_relu_grad(dy[i], y[i]); }
}
CNN_ENTRY_POINTS(relu_backward, RELU_BWD_PARAMS, RELU_BWD_ARGS)

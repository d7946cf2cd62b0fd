// elementwise.cu: bias add, ReLU and their gradients (including the bias gradient).
//
// Layout: y (N, F, P) contiguous, P = the product of the spatial sizes (1 for a
// linear layer's (N, F) output); b and db are (F,).
// Bias gradients are deterministic block reductions: one block per filter f (grid-
// stride over f), each thread sums a fixed subset, then a fixed-order shared-memory
// tree (cnn_block_sum). No atomics: the result depends only on the launch's block size.
#include "common.cuh"

// ReLU that propagates NaN like numpy.maximum(v, 0).
template <typename T>
__device__ __forceinline__ T cnn_relu(T v) { return v < T(0) ? T(0) : v; }

// ---- y = y + b[f] (in place) ----------------------------------------------------------
#define BIAS_FWD_PARAMS(T) T* __restrict__ y, const T* __restrict__ b, int N, int F, int P
#define BIAS_FWD_ARGS y, b, N, F, P

template <typename T>
__device__ __forceinline__ void bias_add_forward_body(BIAS_FWD_PARAMS(T)) {
    const long long total = (long long)N * F * P;
    CNN_GRID_STRIDE_LOOP(i, total) {
        const int f = (int)((i / P) % F);
        y[i] = y[i] + b[f];
    }
}
CNN_ENTRY_POINTS(bias_add_forward, BIAS_FWD_PARAMS, BIAS_FWD_ARGS)

// ---- y = max(y + b[f], 0) (in place) ------------------------------------------------
template <typename T>
__device__ __forceinline__ void bias_relu_forward_body(BIAS_FWD_PARAMS(T)) {
    const long long total = (long long)N * F * P;
    CNN_GRID_STRIDE_LOOP(i, total) {
        const int f = (int)((i / P) % F);
        y[i] = cnn_relu(y[i] + b[f]);
    }
}
CNN_ENTRY_POINTS(bias_relu_forward, BIAS_FWD_PARAMS, BIAS_FWD_ARGS)

// ---- y = max(x, 0) ------------------------------------------------------------------------
#define RELU_FWD_PARAMS(T) const T* __restrict__ x, T* __restrict__ y, long long n
#define RELU_FWD_ARGS x, y, n

template <typename T>
__device__ __forceinline__ void relu_forward_body(RELU_FWD_PARAMS(T)) {
    CNN_GRID_STRIDE_LOOP(i, n) { y[i] = cnn_relu(x[i]); }
}
CNN_ENTRY_POINTS(relu_forward, RELU_FWD_PARAMS, RELU_FWD_ARGS)

// ---- dx = dy where y > 0 else 0 ---------------------------------------------------------
#define RELU_BWD_PARAMS(T) const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, long long n
#define RELU_BWD_ARGS dy, y, dx, n

template <typename T>
__device__ __forceinline__ void relu_backward_body(RELU_BWD_PARAMS(T)) {
    CNN_GRID_STRIDE_LOOP(i, n) { dx[i] = y[i] > T(0) ? dy[i] : T(0); }
}
CNN_ENTRY_POINTS(relu_backward, RELU_BWD_PARAMS, RELU_BWD_ARGS)

// ---- dx = relu'(y) * dy and db[f] = sum over n, p of dx[n, f, p] ----------------------
// One block per f (grid-stride over f). Thread t sums j = t, t + blockDim, ... over the
// flattened (n, p) index j = n*P + p, then the block tree-reduces.
#define RELU_BWD_BIAS_PARAMS(T) \
    const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, T* __restrict__ db, int N, int F, int P
#define RELU_BWD_BIAS_ARGS dy, y, dx, db, N, F, P

template <typename T>
__device__ __forceinline__ void relu_backward_bias_grad_body(RELU_BWD_BIAS_PARAMS(T)) {
    __shared__ T sh[CNN_MAX_BLOCK];
    const long long NP = (long long)N * P;
    for (int f = blockIdx.x; f < F; f += gridDim.x) {  // uniform across the block
        T part = T(0);
        for (long long j = threadIdx.x; j < NP; j += blockDim.x) {
            const long long n = j / P;
            const long long idx = (n * F + f) * P + (j - n * P);
            const T g = y[idx] > T(0) ? dy[idx] : T(0);
            dx[idx] = g;
            part += g;
        }
        const T total = cnn_block_sum(part, sh);
        if (threadIdx.x == 0) db[f] = total;
    }
}
CNN_ENTRY_POINTS(relu_backward_bias_grad, RELU_BWD_BIAS_PARAMS, RELU_BWD_BIAS_ARGS)

// ---- db[f] = sum over n, p of dy[n, f, p] (layers without an activation) -------------
#define BIAS_GRAD_PARAMS(T) const T* __restrict__ dy, T* __restrict__ db, int N, int F, int P
#define BIAS_GRAD_ARGS dy, db, N, F, P

template <typename T>
__device__ __forceinline__ void bias_grad_body(BIAS_GRAD_PARAMS(T)) {
    __shared__ T sh[CNN_MAX_BLOCK];
    const long long NP = (long long)N * P;
    for (int f = blockIdx.x; f < F; f += gridDim.x) {
        T part = T(0);
        for (long long j = threadIdx.x; j < NP; j += blockDim.x) {
            const long long n = j / P;
            part += dy[(n * F + f) * P + (j - n * P)];
        }
        const T total = cnn_block_sum(part, sh);
        if (threadIdx.x == 0) db[f] = total;
    }
}
CNN_ENTRY_POINTS(bias_grad, BIAS_GRAD_PARAMS, BIAS_GRAD_ARGS)

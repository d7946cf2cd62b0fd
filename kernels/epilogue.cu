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
//                            the GEMM's form; with has_bias also the sums of delta over n and
//                            p: part[f*S + s] = the sum over segment s (of S) of filter f's
//                            N*P values, or with `accumulate` part[f*S + s] += that sum
//   sum_segments:            out[r] = part[r*S] + part[r*S + 1] + ... + part[r*S + S-1] (in that
//                            order), or with `accumulate` out[r] += that sum: the second pass of
//                            a segmented sum (db here, dw in depthwise.cu)
//
//   add_act_forward:         y = a + b, relu(a + b) with relu (a residual block's sum and the ReLU
//                            after it, one pass)
//   relu_backward:           dx = dy * (y > 0) (a product: a NaN in dy stays NaN)
//
// The bias gradient db[f] is a deterministic sum in two fixed-order steps, no atomics (as in
// batchnorm.cu): a block per (filter f, segment s) (grid-stride over the F*S blocks), each thread
// a fixed subset of the segment, then the shared-memory tree (cnn_block_sum); then sum_segments
// adds each filter's S partial sums in order. The launcher (cnn_gpu/cuda/ops.py) picks S from the
// shape alone, so a layer's 6-64 filters still fill the GPU and the bits depend only on S and the
// block size. With S = 1 the first launch writes db itself (part = db, `accumulate` as given: a
// Parameter.grad, or the chunks of one batch) and there is no second; without a bias it is an
// elementwise kernel, one thread per element of dst.
//
// float16 (CNN_ENTRY_POINTS_FP16, all but sum_segments): values are read into float, computed in
// float and rounded once where stored; the bias gradient's partial sums `part` (and so db) are
// float32 (float16 gradients would lose the small ones), summed by sum_segments_f32.
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
        CNN_ACC(T) v = cnn_ld(src[cnn_nfp_offset(n, f, p, N, F, P, cm)]);
        if (has_bias) v = v + cnn_ld(b[f]);
        y[i] = cnn_st<T>(relu ? cnn_relu(v) : v);
    }
}
CNN_ENTRY_POINTS_FP16(bias_act_forward, BIAS_ACT_FWD_PARAMS, BIAS_ACT_FWD_ARGS)

// ---- delta = dy (* relu'(y)) into dst, and the segments' sums of delta ----------------------
// has_bias: a block per (f, s), thread t handles the segment's j = j0 + t, j0 + t + blockDim, ...
// of the flattened (n, p) index j = n*P + p; else one thread per element of dst, part and S not
// used. relu == 0: y is not read.
#define ACT_BWD_BIAS_PARAMS(T)                                                                    \
    const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dst, CNN_ACC(T)* __restrict__ part, \
    int N, int F, int P, int S, int cm, int has_bias, int relu, int accumulate
#define ACT_BWD_BIAS_ARGS dy, y, dst, part, N, F, P, S, cm, has_bias, relu, accumulate

// dy, or dy * relu'(y) with the fused ReLU, at offset o of (N, F, P) (in CNN_ACC(T))
template <typename T>
__device__ __forceinline__ CNN_ACC(T) cnn_act_delta(const T* dy, const T* y, long long o, int relu) {
    return relu ? cnn_relu_grad(cnn_ld(dy[o]), cnn_ld(y[o])) : cnn_ld(dy[o]);
}

template <typename T>
__device__ __forceinline__ void act_backward_bias_grad_body(ACT_BWD_BIAS_PARAMS(T)) {
    typedef CNN_ACC(T) A;  // the sums' type: float for float16 storage (part is float too)
    __shared__ A sh[CNN_MAX_BLOCK];
    const long long M = (long long)N * P;
    if (!has_bias) {  // the same for the whole grid: no sums, one thread per element
        CNN_GRID_STRIDE_LOOP(i, M * F) {  // i walks dst (F, N*P) or (N, F, P) in memory order
            const long long f = cm ? i / M : (i / P) % F;
            const long long n = cm ? (i - f * M) / P : i / ((long long)F * P);
            dst[i] = cnn_st<T>(cnn_act_delta(dy, y, (n * F + f) * P + i % P, relu));
        }
        return;
    }
    cnn_segment_blocks(F, S, [&](long long f, int s) {  // segment s of filter f
        A sum = 0;
        cnn_segment_values(s, S, M, P, [&](long long n, long long p) {
            const long long o = (n * F + f) * P + p;  // dy and y are (N, F, P)
            const A g = cnn_act_delta(dy, y, o, relu);
            dst[cm ? f * M + n * P + p : o] = cnn_st<T>(g);
            sum += g;
        });
        sum = cnn_block_sum(sum, sh);
        if (threadIdx.x == 0) {
            const long long b = f * S + s;
            part[b] = accumulate ? part[b] + sum : sum;
        }
    });
}
CNN_ENTRY_POINTS_FP16(act_backward_bias_grad, ACT_BWD_BIAS_PARAMS, ACT_BWD_BIAS_ARGS)

// ---- out[r] (+)= sum_s part[r*S + s]: one thread per row, in the fixed order s = 0 .. S-1 ------
#define SUM_SEGMENTS_PARAMS(T) const T* __restrict__ part, T* __restrict__ out, long long R, int S, int accumulate
#define SUM_SEGMENTS_ARGS part, out, R, S, accumulate

template <typename T>
__device__ __forceinline__ void sum_segments_body(SUM_SEGMENTS_PARAMS(T)) {
    CNN_GRID_STRIDE_LOOP(r, R) {
        const T* pr = part + r * S;
        T sum = T(0);
        for (int s = 0; s < S; ++s) sum += pr[s];
        out[r] = accumulate ? out[r] + sum : sum;
    }
}
CNN_ENTRY_POINTS(sum_segments, SUM_SEGMENTS_PARAMS, SUM_SEGMENTS_ARGS)

// ---- y = a + b (relu: max(., 0)): one thread per element ----------------------------------
#define ADD_ACT_PARAMS(T) const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, long long n, int relu
#define ADD_ACT_ARGS a, b, y, n, relu

template <typename T>
__device__ __forceinline__ void add_act_forward_body(ADD_ACT_PARAMS(T)) {
    CNN_GRID_STRIDE_LOOP(i, n) {
        const CNN_ACC(T) v = cnn_ld(a[i]) + cnn_ld(b[i]);
        y[i] = cnn_st<T>(relu ? cnn_relu(v) : v);
    }
}
CNN_ENTRY_POINTS_FP16(add_act_forward, ADD_ACT_PARAMS, ADD_ACT_ARGS)

// ---- dx = dy * relu'(y): one thread per element -------------------------------------------
#define RELU_BWD_PARAMS(T) const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, long long n
#define RELU_BWD_ARGS dy, y, dx, n

template <typename T>
__device__ __forceinline__ void relu_backward_body(RELU_BWD_PARAMS(T)) {
    CNN_GRID_STRIDE_LOOP(i, n) { dx[i] = cnn_st<T>(cnn_relu_grad(cnn_ld(dy[i]), cnn_ld(y[i]))); }
}
CNN_ENTRY_POINTS_FP16(relu_backward, RELU_BWD_PARAMS, RELU_BWD_ARGS)

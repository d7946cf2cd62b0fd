// pool.cu: 2-D max and average pooling, forward and backward (NCHW, floor mode,
// no dilation).
//
// x (N, C, H, W) -> y (N, C, OH, OW) with OH = (H + 2*PH - KH) / SH + 1, OW likewise
// (computed on the host). Window of output (oh, ow): rows oh*SH - PH + kh, columns
// ow*SW - PW + kw, taps scanned row-major (kh, then kw).
// Backward kernels are gathers (one thread per input element): no atomics.
// Every kernel here has a float16 entry point too (CNN_ENTRY_POINTS_FP16): float sums, one
// rounding at the store.
// Adaptive average pooling (torch's AdaptiveAvgPool2d windows): at the end of the file.
#include "common.cuh"

// Output rows o (0 <= o < O) whose window [o*S - P, o*S - P + K - 1] contains pos.
struct cnn_cover {
    int lo;
    int hi;  // empty when lo > hi
};
__device__ __forceinline__ cnn_cover cnn_covering(int pos, int K, int S, int P, int O) {
    cnn_cover r;
    const int lo = cnn_ceil_div(pos + P - K + 1, S);
    const int hi = cnn_floor_div(pos + P, S);
    r.lo = lo > 0 ? lo : 0;
    r.hi = hi < O - 1 ? hi : O - 1;
    return r;
}

#define POOL_GEOM int N, int C, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW, int OH, int OW
#define POOL_GEOM_ARGS N, C, H, W, KH, KW, SH, SW, PH, PW, OH, OW

// ---- max pooling forward -----------------------------------------------------------
// y = max over the real (non-padding) taps; padding counts as -inf and, since a window
// always holds at least one real element, never wins. argmax = h*W + w of the first
// maximum (strict >). A NaN beats every number and the first NaN stays (NaN propagates),
// like the NumPy path in cnn_gpu/functional/pool.py.
#define MAX_POOL_FWD_PARAMS(T) const T* __restrict__ x, T* __restrict__ y, int* __restrict__ argmax, POOL_GEOM
#define MAX_POOL_FWD_ARGS x, y, argmax, POOL_GEOM_ARGS

template <typename T>
__device__ __forceinline__ void max_pool2d_forward_body(MAX_POOL_FWD_PARAMS(T)) {
    const long long total = (long long)N * C * OH * OW;
    CNN_GRID_STRIDE_LOOP(i, total) {
        const int ow = (int)(i % OW);
        const int oh = (int)((i / OW) % OH);
        const long long nc = i / ((long long)OH * OW);
        const T* plane = x + nc * H * (long long)W;
        const int h0 = oh * SH - PH;
        const int w0 = ow * SW - PW;
        CNN_ACC(T) best = -cnn_limits<CNN_ACC(T)>::inf();
        int arg = -1;
        for (int kh = 0; kh < KH; ++kh) {
            const int h = h0 + kh;
            if (h < 0 || h >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int w = w0 + kw;
                if (w < 0 || w >= W) continue;
                const CNN_ACC(T) v = cnn_ld(plane[h * W + w]);
                if (arg < 0 || v > best || (cnn_isnan(v) && !cnn_isnan(best))) {
                    best = v;
                    arg = h * W + w;
                }
            }
        }
        y[i] = cnn_st<T>(best);  // (a float16 value read and stored back: exact)
        argmax[i] = arg;
    }
}
CNN_ENTRY_POINTS_FP16(max_pool2d_forward, MAX_POOL_FWD_PARAMS, MAX_POOL_FWD_ARGS)

// ---- max pooling backward: one thread per input element ---------------------------
// dx[n, c, h, w] = sum of dy[n, c, oh, ow] over the outputs whose window covers (h, w)
// and whose argmax is h*W + w, in the reference's order: taps kh ascending then kw
// ascending (oh, ow descending), from zero (matches cnn_gpu/functional/reference.py bitwise).
#define MAX_POOL_BWD_PARAMS(T) const T* __restrict__ dy, const int* __restrict__ argmax, T* __restrict__ dx, POOL_GEOM
#define MAX_POOL_BWD_ARGS dy, argmax, dx, POOL_GEOM_ARGS

template <typename T>
__device__ __forceinline__ void max_pool2d_backward_body(MAX_POOL_BWD_PARAMS(T)) {
    const long long total = (long long)N * C * H * W;
    CNN_GRID_STRIDE_LOOP(i, total) {
        const int w = (int)(i % W);
        const int h = (int)((i / W) % H);
        const long long nc = i / ((long long)H * W);
        const int flat = h * W + w;
        const cnn_cover ch = cnn_covering(h, KH, SH, PH, OH);
        const cnn_cover cw = cnn_covering(w, KW, SW, PW, OW);
        const long long obase = nc * OH * (long long)OW;
        CNN_ACC(T) acc = 0;
        for (int oh = ch.hi; oh >= ch.lo; --oh) {  // kh = h + PH - oh*SH ascending
            for (int ow = cw.hi; ow >= cw.lo; --ow) {
                const long long o = obase + (long long)oh * OW + ow;
                if (argmax[o] == flat) acc += cnn_ld(dy[o]);
            }
        }
        dx[i] = cnn_st<T>(acc);
    }
}
CNN_ENTRY_POINTS_FP16(max_pool2d_backward, MAX_POOL_BWD_PARAMS, MAX_POOL_BWD_ARGS)

// ---- average pooling forward ---------------------------------------------------------
// y = (sum of the real taps, kh then kw) * (1 / (KH*KW)): zero padding is counted in the
// divisor (count_include_pad=True). Same operation order as the NumPy path.
#define AVG_POOL_FWD_PARAMS(T) const T* __restrict__ x, T* __restrict__ y, POOL_GEOM
#define AVG_POOL_FWD_ARGS x, y, POOL_GEOM_ARGS

template <typename T>
__device__ __forceinline__ void avg_pool2d_forward_body(AVG_POOL_FWD_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    const long long total = (long long)N * C * OH * OW;
    const A inv = (A)(1.0 / (double)(KH * KW));
    CNN_GRID_STRIDE_LOOP(i, total) {
        const int ow = (int)(i % OW);
        const int oh = (int)((i / OW) % OH);
        const long long nc = i / ((long long)OH * OW);
        const T* plane = x + nc * H * (long long)W;
        const int h0 = oh * SH - PH;
        const int w0 = ow * SW - PW;
        A acc = 0;
        for (int kh = 0; kh < KH; ++kh) {
            const int h = h0 + kh;
            if (h < 0 || h >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int w = w0 + kw;
                if (w < 0 || w >= W) continue;
                acc += cnn_ld(plane[h * W + w]);
            }
        }
        y[i] = cnn_st<T>(acc * inv);
    }
}
CNN_ENTRY_POINTS_FP16(avg_pool2d_forward, AVG_POOL_FWD_PARAMS, AVG_POOL_FWD_ARGS)

// ---- average pooling backward: one thread per input element -----------------------
// dx[n, c, h, w] = sum over the windows containing (h, w), taps kh ascending then kw
// ascending (i.e. oh, ow descending), of dy[n, c, oh, ow] * (1 / (KH*KW)).
#define AVG_POOL_BWD_PARAMS(T) const T* __restrict__ dy, T* __restrict__ dx, POOL_GEOM
#define AVG_POOL_BWD_ARGS dy, dx, POOL_GEOM_ARGS

template <typename T>
__device__ __forceinline__ void avg_pool2d_backward_body(AVG_POOL_BWD_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    const long long total = (long long)N * C * H * W;
    const A inv = (A)(1.0 / (double)(KH * KW));
    CNN_GRID_STRIDE_LOOP(i, total) {
        const int w = (int)(i % W);
        const int h = (int)((i / W) % H);
        const long long nc = i / ((long long)H * W);
        const cnn_cover ch = cnn_covering(h, KH, SH, PH, OH);
        const cnn_cover cw = cnn_covering(w, KW, SW, PW, OW);
        const T* g = dy + nc * OH * (long long)OW;
        A acc = 0;
        for (int oh = ch.hi; oh >= ch.lo; --oh) {  // kh = h + PH - oh*SH ascending
            for (int ow = cw.hi; ow >= cw.lo; --ow) {
                acc += cnn_ld(g[oh * OW + ow]) * inv;
            }
        }
        dx[i] = cnn_st<T>(acc);
    }
}
CNN_ENTRY_POINTS_FP16(avg_pool2d_backward, AVG_POOL_BWD_PARAMS, AVG_POOL_BWD_ARGS)

// ---- adaptive average pooling (torch's windows) ------------------------------------------
// Output o of O over In positions averages [floor(o*In/O), ceil((o+1)*In/O)); windows may
// overlap (In not a multiple of O) and may be one position wide (O > In).
__device__ __forceinline__ int cnn_adaptive_start(int o, int In, int O) { return (int)(((long long)o * In) / O); }
__device__ __forceinline__ int cnn_adaptive_end(int o, int In, int O) {
    return (int)(((long long)(o + 1) * In + O - 1) / O);
}

#define ADAPTIVE_PARAMS(T) const T* __restrict__ src, T* __restrict__ dst, int N, int C, int H, int W, int OH, int OW
#define ADAPTIVE_ARGS src, dst, N, C, H, W, OH, OW

// y = the mean of the window (its sum, row-major, divided by its size): one thread per y element.
// float16: the sum and the quotient in float, rounded once at the store.
template <typename T>
__device__ __forceinline__ void adaptive_avg_pool2d_forward_body(ADAPTIVE_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    const long long total = (long long)N * C * OH * OW;
    CNN_GRID_STRIDE_LOOP(i, total) {  // src = x (N, C, H, W), dst = y (N, C, OH, OW)
        const int ow = (int)(i % OW);
        const int oh = (int)((i / OW) % OH);
        const T* xp = src + (i / ((long long)OH * OW)) * H * W;
        const int h0 = cnn_adaptive_start(oh, H, OH), h1 = cnn_adaptive_end(oh, H, OH);
        const int w0 = cnn_adaptive_start(ow, W, OW), w1 = cnn_adaptive_end(ow, W, OW);
        A sum = 0;
        for (int h = h0; h < h1; ++h)
            for (int w = w0; w < w1; ++w) sum += cnn_ld(xp[(long long)h * W + w]);
        dst[i] = cnn_st<T>(sum / A((h1 - h0) * (w1 - w0)));
    }
}
CNN_ENTRY_POINTS_FP16(adaptive_avg_pool2d_forward, ADAPTIVE_PARAMS, ADAPTIVE_ARGS)

// dx = the sum over the windows (oh, ow) that contain (h, w), in the reference's order (oh, then
// ow), of dy * (1 / |window|) (the reciprocal rounded from double, as the reference's): a gather,
// one thread per dx element. The windows containing h: oh in [floor(h*OH/H), ceil((h+1)*OH/H)),
// the adaptive window of h in the inverse mapping (each candidate is checked all the same).
// float16: the products and their sum in float (the reciprocal rounded to float), one rounding.
template <typename T>
__device__ __forceinline__ void adaptive_avg_pool2d_backward_body(ADAPTIVE_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    const long long total = (long long)N * C * H * W;
    CNN_GRID_STRIDE_LOOP(i, total) {  // src = dy (N, C, OH, OW), dst = dx (N, C, H, W)
        const int w = (int)(i % W);
        const int h = (int)((i / W) % H);
        const T* g = src + (i / ((long long)H * W)) * OH * OW;
        const int oh_lo = cnn_adaptive_start(h, OH, H), oh_hi = cnn_adaptive_end(h, OH, H);
        const int ow_lo = cnn_adaptive_start(w, OW, W), ow_hi = cnn_adaptive_end(w, OW, W);
        A acc = 0;
        for (int oh = oh_lo; oh < oh_hi && oh < OH; ++oh) {
            const int h0 = cnn_adaptive_start(oh, H, OH), h1 = cnn_adaptive_end(oh, H, OH);
            if (h < h0 || h >= h1) continue;
            for (int ow = ow_lo; ow < ow_hi && ow < OW; ++ow) {
                const int w0 = cnn_adaptive_start(ow, W, OW), w1 = cnn_adaptive_end(ow, W, OW);
                if (w < w0 || w >= w1) continue;
                acc += cnn_ld(g[(long long)oh * OW + ow]) * A(1.0 / (double)((h1 - h0) * (w1 - w0)));
            }
        }
        dst[i] = cnn_st<T>(acc);
    }
}
CNN_ENTRY_POINTS_FP16(adaptive_avg_pool2d_backward, ADAPTIVE_PARAMS, ADAPTIVE_ARGS)

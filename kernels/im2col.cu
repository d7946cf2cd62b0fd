// im2col.cu: im2col and its adjoint col2im, for convolution through matrix products.
//
// Notation: x (N, C, H, W); kernel KH x KW; stride SH, SW; zero padding PH, PW;
// dilation DH, DW; OH = (H + 2*PH - DH*(KH-1) - 1) / SH + 1, OW likewise (computed
// on the host and passed in). Column row r = (c*KH + kh)*KW + kw, R = C*KH*KW;
// column p = oh*OW + ow, P = OH*OW.
//
// x and dx are NCHW (N, C, H, W). Two column layouts, one body each (template parameter CM):
//   im2col, col2im:          cols (N, R, P)     -- torch's unfold (cnn_gpu.functional.im2col)
//   im2col_cm, col2im_cm:    cols (R, N*P)      -- channel-major: cols[r, n*P + p]
// The channel-major columns feed the convolution's GEMMs for the whole batch at once:
// y_cm (F, N*P) = W2 (F, R) @ cols, dW2 = delta_cm (F, N*P) @ cols^T, dcols = W2^T @ delta_cm
// (cnn_gpu/cuda/ops.py; the epilogue kernels in epilogue.cu move between (F, N*P) and NCHW).
// Each has a float16 entry point too (CNN_ENTRY_POINTS_FP16): im2col copies the values, col2im sums
// in float and rounds once.
#include "common.cuh"

// element offset of cols[n, r, p] in either layout
template <bool CM>
__device__ __forceinline__ long long cnn_col_offset(long long n, long long r, long long p, int N, long long R, long long P) {
    return CM ? (r * N + n) * P + p : (n * R + r) * P + p;
}

// ---- im2col: one thread per element of cols --------------------------------------
//   cols[n, r, p] = x[n, c, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW]   (0 in the padding)
#define IM2COL_PARAMS(T)                                                          \
    const T* __restrict__ x, T* __restrict__ cols, int N, int C, int H, int W,    \
    int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int OH, int OW
#define IM2COL_ARGS x, cols, N, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW

template <typename T, bool CM>
__device__ __forceinline__ void im2col_impl(IM2COL_PARAMS(T)) {
    const long long P = (long long)OH * OW;
    const long long R = (long long)C * KH * KW;
    const long long total = (long long)N * R * P;
    CNN_GRID_STRIDE_LOOP(i, total) {  // i walks cols in memory order
        const long long p = i % P;
        const long long q = i / P;  // n*R + r (NCHW) or r*N + n (channel-major)
        const long long n = CM ? q % N : q / R;
        const int r = (int)(CM ? q / N : q % R);
        const int ow = (int)(p % OW);
        const int oh = (int)(p / OW);
        const int kw = r % KW;
        const int kh = (r / KW) % KH;
        const int c = r / (KW * KH);
        const int h = oh * SH - PH + kh * DH;
        const int w = ow * SW - PW + kw * DW;
        T v = cnn_st<T>(0);  // a copy: float16 values move as they are
        if (h >= 0 && h < H && w >= 0 && w < W) v = x[((n * C + c) * H + h) * (long long)W + w];
        cols[i] = v;
    }
}
template <typename T>
__device__ __forceinline__ void im2col_body(IM2COL_PARAMS(T)) { im2col_impl<T, false>(IM2COL_ARGS); }
template <typename T>
__device__ __forceinline__ void im2col_cm_body(IM2COL_PARAMS(T)) { im2col_impl<T, true>(IM2COL_ARGS); }
CNN_ENTRY_POINTS_FP16(im2col, IM2COL_PARAMS, IM2COL_ARGS)
CNN_ENTRY_POINTS_FP16(im2col_cm, IM2COL_PARAMS, IM2COL_ARGS)

// ---- col2im: the adjoint, as a gather: one thread per element of dx --------------
// Input row h is read by tap kh of output row oh iff h + PH - kh*DH = oh*SH with
// 0 <= oh < OH. The admissible kh form an arithmetic progression: kh in
// [kh_lo, kh_hi] (from 0 <= oh < OH) stepping by SH / gcd(SH, DH) from the first
// kh that satisfies the divisibility. Same for w. Summation order: kh ascending,
// then kw ascending, from zero; identical to the reference's scatter loop over taps
// (cnn_gpu/functional/reference.py: col2im), so the result matches it bitwise.
struct cnn_tap_range {
    int first;  // first admissible tap, or > last when none
    int last;
    int step;
};

// Admissible taps k (0 <= k < K) with (pos + pad - k*dil) = o*stride, 0 <= o < O.
__device__ __forceinline__ cnn_tap_range cnn_taps_for(int pos, int pad, int K, int stride, int dil, int O) {
    cnn_tap_range t;
    const int base = pos + pad;  // >= 0
    const int hi = base / dil;  // from o >= 0
    t.last = hi < K - 1 ? hi : K - 1;
    const int lo = cnn_ceil_div(base - (O - 1) * stride, dil);  // from o <= O-1
    int k = lo > 0 ? lo : 0;
    t.step = stride / cnn_gcd(stride, dil);
    // the divisibility pattern repeats every `step` taps: look for the first hit
    const int scan_end = k + t.step;
    while (k < scan_end && k <= t.last && (base - k * dil) % stride != 0) ++k;
    t.first = (k < scan_end && k <= t.last) ? k : t.last + 1;
    return t;
}

#define COL2IM_PARAMS(T)                                                          \
    const T* __restrict__ cols, T* __restrict__ dx, int N, int C, int H, int W,   \
    int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int OH, int OW
#define COL2IM_ARGS cols, dx, N, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW

template <typename T, bool CM>
__device__ __forceinline__ void col2im_impl(COL2IM_PARAMS(T)) {
    const long long total = (long long)N * C * H * W;
    const long long P = (long long)OH * OW;
    const long long R = (long long)C * KH * KW;
    CNN_GRID_STRIDE_LOOP(i, total) {  // i walks dx (NCHW) in memory order
        const int w = (int)(i % W);
        const int h = (int)((i / W) % H);
        const long long plane = i / ((long long)H * W);  // n*C + c
        const long long n = plane / C;
        const int c = (int)(plane % C);
        const cnn_tap_range th = cnn_taps_for(h, PH, KH, SH, DH, OH);
        const cnn_tap_range tw = cnn_taps_for(w, PW, KW, SW, DW, OW);
        const long long r0 = (long long)c * KH * KW;  // row of (c, kh=0, kw=0)
        CNN_ACC(T) acc = 0;  // float for float16 storage: rounded once, at the store
        for (int kh = th.first; kh <= th.last; kh += th.step) {
            const int oh = (h + PH - kh * DH) / SH;
            for (int kw = tw.first; kw <= tw.last; kw += tw.step) {
                const int ow = (w + PW - kw * DW) / SW;
                acc += cnn_ld(cols[cnn_col_offset<CM>(n, r0 + (long long)kh * KW + kw, (long long)oh * OW + ow, N, R, P)]);
            }
        }
        dx[i] = cnn_st<T>(acc);
    }
}
template <typename T>
__device__ __forceinline__ void col2im_body(COL2IM_PARAMS(T)) { col2im_impl<T, false>(COL2IM_ARGS); }
template <typename T>
__device__ __forceinline__ void col2im_cm_body(COL2IM_PARAMS(T)) { col2im_impl<T, true>(COL2IM_ARGS); }
CNN_ENTRY_POINTS_FP16(col2im, COL2IM_PARAMS, COL2IM_ARGS)
CNN_ENTRY_POINTS_FP16(col2im_cm, COL2IM_PARAMS, COL2IM_ARGS)

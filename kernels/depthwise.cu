// depthwise.cu: depthwise convolution (groups = C), direct: no columns, no GEMM.
//
// x (N, C, H, W), w (F, 1, KH, KW) with F = C*M (M filters per channel; filter f reads channel
// c = f / M), y (N, F, OH, OW), zero padding PH PW, stride SH SW, dilation DH DW (the notation of
// im2col.cu; OH, OW computed on the host). Tap (kh, kw) of output (oh, ow) reads input row
// ih = oh*SH - PH + kh*DH, column iw = ow*SW - PW + kw*DW.
//
//   depthwise_conv_forward:     y[n, f, oh, ow] = act(sum_{kh, kw} x[n, c, ih, iw] * w[f, kh, kw] + b[f])
//   depthwise_conv_input_grad:  dx[n, c, h, w] = sum_{m, kh, kw} delta[n, c*M + m, oh, ow] * w[c*M + m, kh, kw]
//                               over the (oh, ow) whose tap (kh, kw) reads (h, w): a gather, one
//                               thread per element of dx, in the fixed order m, kh, kw
//   depthwise_conv_weight_grad: dw[f, kh, kw] = sum_{n, oh, ow} delta[n, f, oh, ow] * x[n, c, ih, iw]
//                               a block per (weight r = (f*KH + kh)*KW + kw, segment s of its
//                               N*OH*OW terms) (grid-stride over the R*S blocks, R = F*KH*KW): the
//                               segment's sum (cnn_block_sum) into part[r*S + s], then epilogue.cu's
//                               sum_segments adds each weight's S sums in order: deterministic, no
//                               atomics. With S = 1 part is dw itself and there is no second launch;
//                               `accumulate`: added into it (a Parameter.grad) instead
// delta = dy (* (y > 0) with a fused ReLU, and db, from act_backward_bias_grad in epilogue.cu).
// The taps are summed kh then kw, as the reference's GEMM rows (c*KH + kh)*KW + kw.
//
// float16 (CNN_ENTRY_POINTS_FP16): x, w, b, y, delta, dx are stored as T, read into CNN_ACC(T)
// (float) with cnn_ld, summed in float and rounded once where stored (cnn_st); the weight
// gradient's sums `part` (and so dw) are CNN_ACC(T), float32 for float16 storage (they go into a
// float32 Parameter.grad; float16 sums would lose the small terms), and its second pass is
// epilogue.cu's sum_segments_f32, as for the bias gradient.
#include "common.cuh"

#define DW_GEOM_PARAMS \
    int N, int C, int H, int W, int F, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int OH, int OW
#define DW_GEOM_ARGS N, C, H, W, F, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW

// ---- forward: one thread per element of y --------------------------------------------------
// has_bias == 0: b is not read; relu: max(., 0) propagating NaN (numpy.maximum's).
#define DW_FWD_PARAMS(T) \
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y, \
    DW_GEOM_PARAMS, int has_bias, int relu
#define DW_FWD_ARGS x, w, b, y, DW_GEOM_ARGS, has_bias, relu

template <typename T>
__device__ __forceinline__ void depthwise_conv_forward_body(DW_FWD_PARAMS(T)) {
    const long long total = (long long)N * F * OH * OW;
    const int M = F / C;
    CNN_GRID_STRIDE_LOOP(i, total) {  // i walks y (N, F, OH, OW) in memory order
        const int ow = (int)(i % OW);
        const int oh = (int)((i / OW) % OH);
        const long long nf = i / ((long long)OH * OW);  // n*F + f
        const int f = (int)(nf % F);
        const long long n = nf / F;
        const T* xc = x + (n * C + f / M) * (long long)H * W;
        const T* wf = w + (long long)f * KH * KW;
        CNN_ACC(T) acc = 0;
        for (int kh = 0; kh < KH; ++kh) {
            const int ih = oh * SH - PH + kh * DH;
            if (ih < 0 || ih >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int iw = ow * SW - PW + kw * DW;
                if (iw >= 0 && iw < W) acc += cnn_ld(xc[(long long)ih * W + iw]) * cnn_ld(wf[kh * KW + kw]);
            }
        }
        if (has_bias) acc += cnn_ld(b[f]);
        if (relu) acc = cnn_relu(acc);
        y[i] = cnn_st<T>(acc);
    }
}
CNN_ENTRY_POINTS_FP16(depthwise_conv_forward, DW_FWD_PARAMS, DW_FWD_ARGS)

// ---- input gradient: a gather, one thread per element of dx ----------------------------------
#define DW_DX_PARAMS(T) const T* __restrict__ delta, const T* __restrict__ w, T* __restrict__ dx, DW_GEOM_PARAMS
#define DW_DX_ARGS delta, w, dx, DW_GEOM_ARGS

template <typename T>
__device__ __forceinline__ void depthwise_conv_input_grad_body(DW_DX_PARAMS(T)) {
    const long long total = (long long)N * C * H * W;
    const int M = F / C;
    CNN_GRID_STRIDE_LOOP(i, total) {  // i walks dx (N, C, H, W) in memory order
        const int iw = (int)(i % W);
        const int ih = (int)((i / W) % H);
        const long long nc = i / ((long long)H * W);  // n*C + c
        const int c = (int)(nc % C);
        const long long n = nc / C;
        CNN_ACC(T) acc = 0;
        for (int m = 0; m < M; ++m) {
            const int f = c * M + m;
            const T* d = delta + (n * F + f) * (long long)OH * OW;
            const T* wf = w + (long long)f * KH * KW;
            for (int kh = 0; kh < KH; ++kh) {
                const int th = ih + PH - kh * DH;  // = oh * SH
                if (th < 0 || th % SH) continue;
                const int oh = th / SH;
                if (oh >= OH) continue;
                for (int kw = 0; kw < KW; ++kw) {
                    const int tw = iw + PW - kw * DW;
                    if (tw < 0 || tw % SW) continue;
                    const int ow = tw / SW;
                    if (ow < OW) acc += cnn_ld(d[(long long)oh * OW + ow]) * cnn_ld(wf[kh * KW + kw]);
                }
            }
        }
        dx[i] = cnn_st<T>(acc);
    }
}
CNN_ENTRY_POINTS_FP16(depthwise_conv_input_grad, DW_DX_PARAMS, DW_DX_ARGS)

// ---- weight gradient: a block per (weight, segment), a deterministic block reduction ----------
// part (R*S sums, or dw itself with S = 1) is CNN_ACC(T): float32 for float16 delta and x.
#define DW_DW_PARAMS(T)                                                                          \
    const T* __restrict__ delta, const T* __restrict__ x, CNN_ACC(T)* __restrict__ part, DW_GEOM_PARAMS, int S, \
    int accumulate
#define DW_DW_ARGS delta, x, part, DW_GEOM_ARGS, S, accumulate

template <typename T>
__device__ __forceinline__ void depthwise_conv_weight_grad_body(DW_DW_PARAMS(T)) {
    typedef CNN_ACC(T) A;  // the sums' type: float for float16 storage (part is float too)
    __shared__ A sh[CNN_MAX_BLOCK];
    const int M = F / C;
    const long long P = (long long)OH * OW;
    cnn_segment_blocks((long long)F * KH * KW, S, [&](long long r, int s) {  // segment s of weight r
        const int kw = (int)(r % KW);
        const int kh = (int)((r / KW) % KH);
        const int f = (int)(r / ((long long)KW * KH));
        const long long c = f / M;
        A sum = 0;
        cnn_segment_values(s, S, N * P, P, [&](long long n, long long p) {  // p = oh*OW + ow
            const int ih = (int)(p / OW) * SH - PH + kh * DH;
            const int iw = (int)(p % OW) * SW - PW + kw * DW;
            if (ih >= 0 && ih < H && iw >= 0 && iw < W)
                sum += cnn_ld(delta[(n * F + f) * P + p]) * cnn_ld(x[((n * C + c) * H + ih) * (long long)W + iw]);
        });
        sum = cnn_block_sum(sum, sh);
        if (threadIdx.x == 0) {
            const long long b = r * S + s;
            part[b] = accumulate ? part[b] + sum : sum;
        }
    });
}
CNN_ENTRY_POINTS_FP16(depthwise_conv_weight_grad, DW_DW_PARAMS, DW_DW_ARGS)

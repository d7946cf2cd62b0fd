// activation.cu: the elementwise activations other than ReLU (ReLU is fused into the epilogues,
// epilogue.cu), forward and backward, one thread per element, one launch each. They compute
// functional/reference.py's formulas in its order of operations (so float32 and float64 agree with
// it to the math library's rounding), with delta = dL/dy and each backward dx = delta * f'(x):
//
//   leaky_relu_forward:   y = x > 0 ? x : x * slope
//   leaky_relu_backward:  dx = x > 0 ? dy : dy * slope                (the cache: x)
//   sigmoid_forward:      e = exp(-|x|);  y = x >= 0 ? 1 / (1 + e) : e / (1 + e)  (never overflows)
//   sigmoid_backward:     dx = dy * y * (1 - y)                       (the cache: y)
//   tanh_forward:         y = tanh(x)
//   tanh_backward:        dx = dy * (1 - y * y)                       (the cache: y)
//   gelu_forward:         approx_tanh = 0 (torch's approximate="none"):
//                             y = 0.5 * x * (1 + erf(x * (1 / sqrt 2)))
//                         approx_tanh = 1 ("tanh"): u = sqrt(2 / pi) * (x + 0.044715 * x * x * x),
//                             y = 0.5 * x * (1 + tanh(u))
//   gelu_backward:        dx = dy * f'(x)                             (the cache: x)
//                             "none": f'(x) = 0.5 * (1 + erf(x / sqrt 2)) + x * (1 / sqrt(2 pi)) * exp(-0.5 * x * x)
//                             "tanh": th = tanh(u), f'(x) = 0.5 * (1 + th)
//                                     + 0.5 * x * (1 - th * th) * sqrt(2 / pi) * (1 + 3 * 0.044715 * x * x)
//
// Products are evaluated left to right as NumPy evaluates the reference's expressions (0.5 * x
// first, then the factor); the constants are the reference's doubles rounded to CNN_ACC(T) (as
// its `t(constant)`). A backward is a product with delta, so a NaN in dy stays NaN.
// float16 storage (the _f16 entry points): read into float, computed in float, rounded once where
// stored -- reference.float16_storage's order; leaky_relu and the sigmoid / tanh backward use no
// math library and match it bit for bit, the others within one float16 rounding where CUDA's (or
// glibc's, in the emulation) expf / tanhf / erff and NumPy's / SciPy's differ in the last float bit.
#include "common.cuh"

#define CNN_GELU_SQRT_HALF 0.7071067811865476   // 1 / sqrt(2)
#define CNN_GELU_INV_SQRT_2PI 0.3989422804014327  // 1 / sqrt(2 pi)
#define CNN_GELU_TANH_C 0.7978845608028654      // sqrt(2 / pi)
#define CNN_GELU_TANH_K 0.044715

// ---- leaky ReLU ------------------------------------------------------------------------------
#define LEAKY_FWD_PARAMS(T) const T* __restrict__ x, T* __restrict__ y, long long n, CNN_ACC(T) slope
#define LEAKY_FWD_ARGS x, y, n, slope

template <typename T>
__device__ __forceinline__ void leaky_relu_forward_body(LEAKY_FWD_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    CNN_GRID_STRIDE_LOOP(i, n) {
        const A v = cnn_ld(x[i]);
        y[i] = cnn_st<T>(v > A(0) ? v : v * slope);
    }
}
CNN_ENTRY_POINTS_FP16(leaky_relu_forward, LEAKY_FWD_PARAMS, LEAKY_FWD_ARGS)

#define LEAKY_BWD_PARAMS(T) \
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, long long n, CNN_ACC(T) slope
#define LEAKY_BWD_ARGS dy, x, dx, n, slope

template <typename T>
__device__ __forceinline__ void leaky_relu_backward_body(LEAKY_BWD_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    CNN_GRID_STRIDE_LOOP(i, n) {
        const A d = cnn_ld(dy[i]);
        dx[i] = cnn_st<T>(cnn_ld(x[i]) > A(0) ? d : d * slope);
    }
}
CNN_ENTRY_POINTS_FP16(leaky_relu_backward, LEAKY_BWD_PARAMS, LEAKY_BWD_ARGS)

// ---- y = f(x) and dx = dy * g(y): sigmoid, tanh ------------------------------------------------
#define UNARY_PARAMS(T) const T* __restrict__ x, T* __restrict__ y, long long n
#define UNARY_ARGS x, y, n
#define FROM_Y_PARAMS(T) const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, long long n
#define FROM_Y_ARGS dy, y, dx, n

template <typename T>
__device__ __forceinline__ void sigmoid_forward_body(UNARY_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    CNN_GRID_STRIDE_LOOP(i, n) {
        const A v = cnn_ld(x[i]);
        const A e = cnn_exp(v < A(0) ? v : -v);  // exp(-|x|) (NaN stays NaN)
        y[i] = cnn_st<T>(v >= A(0) ? A(1) / (A(1) + e) : e / (A(1) + e));
    }
}
CNN_ENTRY_POINTS_FP16(sigmoid_forward, UNARY_PARAMS, UNARY_ARGS)

template <typename T>
__device__ __forceinline__ void sigmoid_backward_body(FROM_Y_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    CNN_GRID_STRIDE_LOOP(i, n) {
        const A s = cnn_ld(y[i]);
        dx[i] = cnn_st<T>(cnn_ld(dy[i]) * s * (A(1) - s));
    }
}
CNN_ENTRY_POINTS_FP16(sigmoid_backward, FROM_Y_PARAMS, FROM_Y_ARGS)

template <typename T>
__device__ __forceinline__ void tanh_forward_body(UNARY_PARAMS(T)) {
    CNN_GRID_STRIDE_LOOP(i, n) { y[i] = cnn_st<T>(cnn_tanh(cnn_ld(x[i]))); }
}
CNN_ENTRY_POINTS_FP16(tanh_forward, UNARY_PARAMS, UNARY_ARGS)

template <typename T>
__device__ __forceinline__ void tanh_backward_body(FROM_Y_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    CNN_GRID_STRIDE_LOOP(i, n) {
        const A t = cnn_ld(y[i]);
        dx[i] = cnn_st<T>(cnn_ld(dy[i]) * (A(1) - t * t));
    }
}
CNN_ENTRY_POINTS_FP16(tanh_backward, FROM_Y_PARAMS, FROM_Y_ARGS)

// ---- GELU ------------------------------------------------------------------------------------
// tanh(sqrt(2/pi) * (x + 0.044715 * x * x * x)), the tanh form's inner value
template <typename A>
__device__ __forceinline__ A cnn_gelu_tanh_u(A x) {
    return cnn_tanh(A(CNN_GELU_TANH_C) * (x + A(CNN_GELU_TANH_K) * x * x * x));
}

#define GELU_FWD_PARAMS(T) const T* __restrict__ x, T* __restrict__ y, long long n, int approx_tanh
#define GELU_FWD_ARGS x, y, n, approx_tanh

template <typename T>
__device__ __forceinline__ void gelu_forward_body(GELU_FWD_PARAMS(T)) {
    typedef CNN_ACC(T) A;
    CNN_GRID_STRIDE_LOOP(i, n) {
        const A v = cnn_ld(x[i]);
        const A phi2 = approx_tanh ? cnn_gelu_tanh_u(v) : cnn_erf(v * A(CNN_GELU_SQRT_HALF));  // 2 Phi(x) - 1
        y[i] = cnn_st<T>(A(0.5) * v * (A(1) + phi2));
    }
}
CNN_ENTRY_POINTS_FP16(gelu_forward, GELU_FWD_PARAMS, GELU_FWD_ARGS)

#define GELU_BWD_PARAMS(T) \
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, long long n, int approx_tanh
#define GELU_BWD_ARGS dy, x, dx, n, approx_tanh

// f'(x) of the tanh form and of the erf form, in the reference's order
template <typename A>
__device__ __forceinline__ A cnn_gelu_grad(A x, int approx_tanh) {
    if (approx_tanh) {
        const A th = cnn_gelu_tanh_u(x);
        return A(0.5) * (A(1) + th) +
               A(0.5) * x * (A(1) - th * th) * A(CNN_GELU_TANH_C) * (A(1) + A(3 * CNN_GELU_TANH_K) * x * x);
    }
    return A(0.5) * (A(1) + cnn_erf(x * A(CNN_GELU_SQRT_HALF))) +
           x * A(CNN_GELU_INV_SQRT_2PI) * cnn_exp(A(-0.5) * x * x);
}

template <typename T>
__device__ __forceinline__ void gelu_backward_body(GELU_BWD_PARAMS(T)) {
    CNN_GRID_STRIDE_LOOP(i, n) { dx[i] = cnn_st<T>(cnn_ld(dy[i]) * cnn_gelu_grad(cnn_ld(x[i]), approx_tanh)); }
}
CNN_ENTRY_POINTS_FP16(gelu_backward, GELU_BWD_PARAMS, GELU_BWD_ARGS)

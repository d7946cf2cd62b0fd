// common.cuh: helpers shared by every kernel file.
//
// Compiles in three settings, so it must stay free of host headers:
//   * NVRTC (through CuPy's RawModule, cnn_gpu/cuda.py inlines this file),
//   * NVRTC in tests/test_kernels_nvrtc.py (sm_70, sm_80, sm_90, no GPU needed),
//   * g++ with tests/emulation/cuda_shim.h force-included (CPU emulation tests).
//
// Conventions (see kernels/README.md):
//   * every kernel body is written once as a template over the element type T and
//     instantiated by CNN_ENTRY_POINTS as extern "C" <name>_f32 / <name>_f64 (CNN_ENTRY_POINTS_FP16:
//     and <name>_f16, float16 storage with float arithmetic; see "float16 storage" below);
//   * grid-stride loops with 64-bit indices (CNN_GRID_STRIDE_LOOP);
//   * gathers only, no atomics: results are bitwise reproducible;
//   * block reductions use a fixed tree order (cnn_block_sum / cnn_block_max);
//   * a sum over a channel's N*H*W values runs as blocks over (row, segment), then a fixed-order
//     sum of the segments' partial sums (cnn_segment_blocks / cnn_segment_values).
#ifndef CNN_GPU_COMMON_CUH
#define CNN_GPU_COMMON_CUH

// Largest block size the shared-memory reductions support (CUDA's limit too).
#define CNN_MAX_BLOCK 1024

// IEEE infinities without <cmath> (NVRTC has no INFINITY macro).
#define CNN_INFINITY_F (__int_as_float(0x7f800000))
#define CNN_INFINITY_D (__longlong_as_double(0x7ff0000000000000LL))

// for (long long i = global thread id; i < n; i += total threads)
#define CNN_GRID_STRIDE_LOOP(i, n)                                                   \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n);   \
         i += (long long)blockDim.x * gridDim.x)

// Two extern "C" entry points, NAME_f32 and NAME_f64, around the template
// __device__ function NAME_body<T>. PARAMS is a function-like macro giving the
// parameter list for an element type T; ARGS is the matching argument list.
//   #define FOO_PARAMS(T) const T* __restrict__ x, T* __restrict__ y, long long n
//   #define FOO_ARGS x, y, n
//   template <typename T> __device__ __forceinline__ void foo_body(FOO_PARAMS(T)) {...}
//   CNN_ENTRY_POINTS(foo, FOO_PARAMS, FOO_ARGS)
// cnn_gpu.cuda.list_kernels() finds the entry points by reading these lines.
#define CNN_ENTRY_POINTS(NAME, PARAMS, ARGS)                                          \
    extern "C" __global__ void NAME##_f32(PARAMS(float)) { NAME##_body<float>(ARGS); } \
    extern "C" __global__ void NAME##_f64(PARAMS(double)) { NAME##_body<double>(ARGS); }

// ---- float16 storage ---------------------------------------------------------------------
// A kernel written for float16 too stores its arrays as T (float, double or __half) and computes
// in CNN_ACC(T): float for __half and float, double for double. It reads with cnn_ld (__half ->
// float exactly; identity otherwise) and writes with cnn_st<T> (float -> __half rounded to nearest
// even, beyond float16's range +-inf; identity otherwise), so its float32 and float64 entry points
// are the same code as before, and the float16 one rounds only where it stores. Scalar parameters
// are CNN_ACC(T). CNN_ENTRY_POINTS_FP16 adds NAME_f16 (T = __half) to the two entry points; it is
// compiled when CNN_FP16 is defined: cnn_gpu/cuda/build.py defines it, with cuda_fp16.h's folder
// on the include path, where it finds the CUDA headers; the CPU emulation defines it with its own
// __half (tests/emulation/cuda_shim.h, g++'s _Float16).
#if defined(CNN_FP16) && defined(__CUDACC_RTC__)
#include <cuda_fp16.h>
#endif

template <typename T> struct cnn_acc { typedef T type; };
#define CNN_ACC(T) typename cnn_acc<T>::type

template <typename T> __device__ __forceinline__ T cnn_ld(T v) { return v; }
template <typename T> __device__ __forceinline__ T cnn_st(CNN_ACC(T) v) { return v; }

#ifdef CNN_FP16
template <> struct cnn_acc<__half> { typedef float type; };
__device__ __forceinline__ float cnn_ld(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ __half cnn_st<__half>(float v) { return __float2half_rn(v); }
#define CNN_IF_FP16(...) __VA_ARGS__
#else
#define CNN_IF_FP16(...)
#endif

// NAME_f32, NAME_f64 and (with CNN_FP16) NAME_f16, for a body written with cnn_ld / cnn_st. (ARGS
// is used here directly, not handed to another macro, where its commas would split it.)
#define CNN_ENTRY_POINTS_FP16(NAME, PARAMS, ARGS)                                      \
    extern "C" __global__ void NAME##_f32(PARAMS(float)) { NAME##_body<float>(ARGS); } \
    extern "C" __global__ void NAME##_f64(PARAMS(double)) { NAME##_body<double>(ARGS); } \
    CNN_IF_FP16(extern "C" __global__ void NAME##_f16(PARAMS(__half)) { NAME##_body<__half>(ARGS); })

// ---- per-type math (explicit overloads: no reliance on <cmath> overload sets) ----
__device__ __forceinline__ float cnn_exp(float x) { return expf(x); }
__device__ __forceinline__ double cnn_exp(double x) { return exp(x); }
__device__ __forceinline__ float cnn_log(float x) { return logf(x); }
__device__ __forceinline__ double cnn_log(double x) { return log(x); }
__device__ __forceinline__ float cnn_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double cnn_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float cnn_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double cnn_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float cnn_erf(float x) { return erff(x); }
__device__ __forceinline__ double cnn_erf(double x) { return erf(x); }

template <typename T> struct cnn_limits;
template <> struct cnn_limits<float> {
    static __device__ __forceinline__ float inf() { return CNN_INFINITY_F; }
    static __device__ __forceinline__ float nan() { return __int_as_float(0x7fc00000); }
};
template <> struct cnn_limits<double> {
    static __device__ __forceinline__ double inf() { return CNN_INFINITY_D; }
    static __device__ __forceinline__ double nan() { return __longlong_as_double(0x7ff8000000000000LL); }
};

template <typename T>
__device__ __forceinline__ bool cnn_isnan(T v) { return v != v; }

// The ReLU fused into the kernels (epilogue, batchnorm, depthwise): max(v, 0) propagating NaN
// like numpy.maximum(v, 0), and its backward dy * relu'(y) (a product: a NaN in dy stays NaN).
template <typename T>
__device__ __forceinline__ T cnn_relu(T v) { return v < T(0) ? T(0) : v; }
template <typename T>
__device__ __forceinline__ T cnn_relu_grad(T dy, T y) { return dy * (y > T(0) ? T(1) : T(0)); }

// max that propagates NaN (like numpy.maximum / x.max()); first NaN wins.
template <typename T>
__device__ __forceinline__ T cnn_max_nan(T a, T b) {
    return (b > a || (cnn_isnan(b) && !cnn_isnan(a))) ? b : a;
}

// ceil(a / b) for b > 0 and any sign of a
__device__ __forceinline__ int cnn_ceil_div(int a, int b) {
    return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}
// floor(a / b) for b > 0 and any sign of a
__device__ __forceinline__ int cnn_floor_div(int a, int b) {
    return a >= 0 ? a / b : -((-a + b - 1) / b);
}

__device__ __forceinline__ int cnn_gcd(int a, int b) {
    while (b != 0) {
        const int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

// ---- counter-based random numbers (no generator state) -------------------------
// cnn_mix64 is the splitmix64 finaliser: a bijection of 64-bit words that scrambles every
// bit. A random number is a pure function of (key, counter): u = top bits of
// cnn_mix64(key + cnn_mix64(counter)), so any element of any draw can be recomputed on its
// own, in any order, on the CPU (cnn_gpu/functional/counter_rng.py, bit for bit) or the GPU.
__device__ __forceinline__ unsigned long long cnn_mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
__device__ __forceinline__ unsigned long long cnn_random_bits(unsigned long long key, unsigned long long counter) {
    return cnn_mix64(key + cnn_mix64(counter));
}
// uniform in [0, 1): the top 24 bits (float) or 53 bits (double), times 2^-24 / 2^-53 (exact)
template <typename T> __device__ __forceinline__ T cnn_uniform(unsigned long long bits);
template <> __device__ __forceinline__ float cnn_uniform<float>(unsigned long long bits) {
    return (float)(bits >> 40) * (1.0f / 16777216.0f);
}
template <> __device__ __forceinline__ double cnn_uniform<double>(unsigned long long bits) {
    return (double)(bits >> 11) * (1.0 / 9007199254740992.0);
}

// ---- deterministic block reductions ------------------------------------------
// Every thread of the block must call these (they contain __syncthreads).
// `sh` is a __shared__ array with at least blockDim.x elements. The tree order
// depends only on blockDim.x, so the result is bitwise reproducible for a given
// launch configuration. The total is returned to every thread.
template <typename T>
__device__ __forceinline__ T cnn_block_sum(T v, T* sh) {
    const unsigned tid = threadIdx.x;
    const unsigned nt = blockDim.x;
    sh[tid] = v;
    __syncthreads();
    unsigned p = 1;
    while (p < nt) p <<= 1;
    for (unsigned s = p >> 1; s > 0; s >>= 1) {
        if (tid < s && tid + s < nt) sh[tid] = sh[tid] + sh[tid + s];
        __syncthreads();
    }
    const T total = sh[0];
    __syncthreads();  // sh may be reused by the caller right away
    return total;
}

template <typename T>
__device__ __forceinline__ T cnn_block_max(T v, T* sh) {
    const unsigned tid = threadIdx.x;
    const unsigned nt = blockDim.x;
    sh[tid] = v;
    __syncthreads();
    unsigned p = 1;
    while (p < nt) p <<= 1;
    for (unsigned s = p >> 1; s > 0; s >>= 1) {
        if (tid < s && tid + s < nt) sh[tid] = cnn_max_nan(sh[tid], sh[tid + s]);
        __syncthreads();
    }
    const T total = sh[0];
    __syncthreads();
    return total;
}

// ---- segmented row sums (epilogue.cu's bias gradient, depthwise.cu's weight gradient) ---------
// A row r (a filter, a weight) sums M = N*P values j = n*P + p. They are cut into S segments of
// L = ceil(M / S) values; block b = r*S + s (grid-stride over the R*S blocks) sums segment s of
// row r into part[b] (cnn_block_sum), and a second launch adds each row's S partial sums in the
// fixed order s = 0, 1, ... (epilogue.cu: sum_segments). The launcher picks S from the shape
// alone, so the bits depend on S and the block size, never on the grid. (batchnorm.cu walks its
// channels' segments the same way, with helpers of its own.)

// f(r, s) for every (row, segment) block of this thread block: b = blockIdx.x, + gridDim.x, ...
// < R*S (uniform across the block, so f may synchronise it)
template <typename Fn>
__device__ __forceinline__ void cnn_segment_blocks(long long R, int S, Fn f) {
    for (long long b = blockIdx.x; b < R * S; b += gridDim.x) f(b / S, (int)(b % S));
}

// f(n, p) for this thread's values of segment s (of S) of M = N*P values: j = n*P + p = j0 +
// threadIdx.x, j0 + threadIdx.x + blockDim.x, ... < j1; (n, p) advance without a division per value
template <typename Fn>
__device__ __forceinline__ void cnn_segment_values(int s, int S, long long M, long long P, Fn f) {
    const long long L = (M + S - 1) / S, j0 = (long long)s * L, j1 = j0 + L < M ? j0 + L : M;
    long long j = j0 + threadIdx.x;
    long long n = j / P, p = j - n * P;  // once per thread
    const long long dn = blockDim.x / P, dp = blockDim.x % P;
    for (; j < j1; j += blockDim.x) {
        f(n, p);
        p += dp;
        n += dn;
        if (p >= P) {
            p -= P;
            ++n;
        }
    }
}

#endif  // CNN_GPU_COMMON_CUH

// cuda_shim.h: the CUDA built-ins the kernels use, for compiling kernels/*.cu with g++.
//
// Force-included (g++ -include cuda_shim.h) by tests/emulation/harness.py. The grid is
// run on the CPU by tests/emulation/launcher.h: one OS thread, every CUDA thread of a
// block a cooperative fiber (ucontext) that yields only at __syncthreads, so block-level
// reductions see real barrier semantics and a run is deterministic. Shared memory is a
// function-local static (one block runs at a time).
#ifndef CNN_GPU_CUDA_SHIM_H
#define CNN_GPU_CUDA_SHIM_H

#include <math.h>    // expf, exp, logf, log, sqrtf, sqrt (global namespace, like CUDA)
#include <string.h>  // memcpy

// ---- qualifiers --------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __launch_bounds__(...)
// __restrict__ is a g++ extension already.

// ---- thread geometry ---------------------------------------------------------------------
struct dim3 {
    unsigned int x, y, z;
};
typedef dim3 uint3;

// Set by the launcher before any kernel code of that thread runs (and on every fiber switch).
inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim = {1, 1, 1};
inline thread_local dim3 gridDim = {1, 1, 1};

// Defined in launcher.h: yields the current fiber until every thread of the block arrives.
void __syncthreads();

// ---- bit casts (CUDA device intrinsics) --------------------------------------------------
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, sizeof i);
    return i;
}
inline double __longlong_as_double(long long i) {
    double d;
    memcpy(&d, &i, sizeof d);
    return d;
}
inline long long __double_as_longlong(double d) {
    long long i;
    memcpy(&i, &d, sizeof i);
    return i;
}

// ---- float16 (cuda_fp16.h's __half as kernels/common.cuh uses it: storage only) --------------
// g++'s _Float16 (IEEE binary16). No arithmetic operators on purpose: a kernel must compute in
// float (cnn_ld) and round when it stores (cnn_st), so half arithmetic fails to compile here.
// float -> _Float16 rounds to nearest even and gives +-inf beyond the range, as __float2half_rn.
struct __half {
    _Float16 x;
};
inline float __half2float(__half h) { return (float)h.x; }
inline __half __float2half_rn(float f) {
    __half h;
    h.x = (_Float16)f;
    return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }

#endif  // CNN_GPU_CUDA_SHIM_H

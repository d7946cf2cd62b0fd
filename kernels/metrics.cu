// metrics.cu: one step's share of its epoch's running sums, added on the device.
//
// loss (0-d, the batch mean), logits z (N, K), labels (N,) int64; the sums are float64 / int64:
//   loss_sum[0]  += double(loss * N)              (the product in T, as `loss * N` in xp code)
//   correct[0]   += #{n : argmax_k z[n, k] == labels[n]}
//   step_losses[counter[0]] = double(loss)        (when 0 <= counter < S)
//   counter[0]   += 1
// argmax as NumPy's: the first maximum, and the first NaN if a row holds one. The step number lives
// in device memory (counter), so a CUDA graph that replays this launch writes each step's loss
// into its own slot; the host only resets the sums at an epoch's start. Same formulas as
// cnn_gpu.train.Meter.add on NumPy. One block; the hit count is a fixed-order block sum (integers:
// exact in any order).
#include "common.cuh"

#define EPOCH_SUMS_PARAMS(T)                                                                      \
    const T* __restrict__ loss, const T* __restrict__ logits, const long long* __restrict__ labels, \
    double* __restrict__ loss_sum, long long* __restrict__ correct, double* __restrict__ step_losses, \
    long long* __restrict__ counter, int N, int K, int S
#define EPOCH_SUMS_ARGS loss, logits, labels, loss_sum, correct, step_losses, counter, N, K, S

template <typename T>
__device__ __forceinline__ void epoch_sums_body(EPOCH_SUMS_PARAMS(T)) {
    __shared__ long long sh[CNN_MAX_BLOCK];
    if (blockIdx.x != 0) return;  // uniform across the block
    long long hits = 0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        const T* z = logits + (long long)n * K;
        int best = 0;
        T m = z[0];
        for (int k = 1; k < K && !cnn_isnan(m); ++k) {
            if (z[k] > m || cnn_isnan(z[k])) {
                m = z[k];
                best = k;
            }
        }
        hits += labels[n] == (long long)best ? 1 : 0;
    }
    hits = cnn_block_sum(hits, sh);
    if (threadIdx.x == 0) {
        const T l = loss[0];
        loss_sum[0] += (double)(l * (T)N);
        correct[0] += hits;
        const long long c = counter[0];
        if (c >= 0 && c < S) step_losses[c] = (double)l;
        counter[0] = c + 1;
    }
}
CNN_ENTRY_POINTS(epoch_sums, EPOCH_SUMS_PARAMS, EPOCH_SUMS_ARGS)

// augment.cu: device-side data augmentation, random crop + horizontal flip as one gather.
//
// x (N, C, H, W) -> y (N, C, OH, OW). Sample n's window starts at (oy, ox) in x padded by
// (PH, PW) on each side (zeros, or torch's "reflect": -1 -> 1, H -> H - 2) and is mirrored
// left-right when flip[n]:
//   oy = bits(crop_key, 2n)     mod (H + 2*PH - OH + 1)
//   ox = bits(crop_key, 2n + 1) mod (W + 2*PW - OW + 1)
//   flip = (bits(flip_key, n) >> 11) < flip_threshold      (flip_threshold = ceil(p * 2^53))
//   y[n, c, i, j] = x_padded[n, c, oy + i, ox + (flip ? OW - 1 - j : j)]
// bits = cnn_random_bits (common.cuh), the counter-based generator of
// cnn_gpu/functional/counter_rng.py: the same offsets and flips as the reference engine
// (crop_flip in cnn_gpu/functional/reference.py), so CPU and GPU give identical batches.
// The 64-bit keys arrive as long long (their bits reinterpreted): as the arguments crop_key and
// flip_key, or with use_scalars from scalars (2,) = {crop_key, flip_key} in device memory, written
// by the host before the launch (a CUDA graph replays frozen arguments; scalars is not read
// otherwise). One thread per element of y recomputes its sample's draws (three hashes); no state,
// no atomics.
#include "common.cuh"

#define CROP_FLIP_PARAMS(T)                                                                            \
    const T* __restrict__ x, T* __restrict__ y, int N, int C, int H, int W, int OH, int OW, int PH, int PW, \
    int reflect, long long crop_key, long long flip_key, long long flip_threshold,                       \
    const long long* __restrict__ scalars, int use_scalars
#define CROP_FLIP_ARGS \
    x, y, N, C, H, W, OH, OW, PH, PW, reflect, crop_key, flip_key, flip_threshold, scalars, use_scalars

__device__ __forceinline__ int cnn_reflect(int r, int n) {  // torch's reflect padding (pad < n)
    return r < 0 ? -r : (r >= n ? 2 * (n - 1) - r : r);
}

template <typename T>
__device__ __forceinline__ void crop_flip_body(CROP_FLIP_PARAMS(T)) {
    const long long total = (long long)N * C * OH * OW;
    const unsigned long long ck = (unsigned long long)(use_scalars ? scalars[0] : crop_key);
    const unsigned long long fk = (unsigned long long)(use_scalars ? scalars[1] : flip_key);
    const unsigned long long ry = (unsigned long long)(H + 2 * PH - OH + 1);
    const unsigned long long rx = (unsigned long long)(W + 2 * PW - OW + 1);
    CNN_GRID_STRIDE_LOOP(i, total) {  // i walks y (NCHW) in memory order
        const int j = (int)(i % OW);
        const long long q = i / OW;
        const int oi = (int)(q % OH);
        const long long nc = q / OH;  // n*C + c
        const unsigned long long n = (unsigned long long)(nc / C);
        const int oy = (int)(cnn_random_bits(ck, 2ULL * n) % ry);
        const int ox = (int)(cnn_random_bits(ck, 2ULL * n + 1ULL) % rx);
        const bool flip = (long long)(cnn_random_bits(fk, n) >> 11) < flip_threshold;
        int r = oy + oi - PH;
        int s = ox + (flip ? OW - 1 - j : j) - PW;
        T v = T(0);
        if (reflect) {
            r = cnn_reflect(r, H);
            s = cnn_reflect(s, W);
            v = x[(nc * H + r) * (long long)W + s];
        } else if (r >= 0 && r < H && s >= 0 && s < W) {
            v = x[(nc * H + r) * (long long)W + s];
        }
        y[i] = v;
    }
}
CNN_ENTRY_POINTS(crop_flip, CROP_FLIP_PARAMS, CROP_FLIP_ARGS)

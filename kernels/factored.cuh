// Factored second-moment statistics on the GPU (driver code, not generated; its CPU
// counterpart is fastopt/cpu/factored.py). A tensor of shape (..., r, c) is batch matrices of
// r x c; row q (= matrix * r + row) of tensor s is row_var[layout[3s] + q], column k of matrix
// b is col_var[layout[3s + 1] + b * c + k]. The tables (fastopt/segments.py,
// SegmentTable.gpu_plan; FACTORED_SIGNATURE in fastopt/algorithms/_spec.py) cut the work:
//   fo_factored_tile_sums (a block per tile): each tile's row sums of g^2 over its strip of
//       columns (a warp per row) and column sums over its rows, into tile_row_sums /
//       tile_col_sums; small matrices a thread each, whole, into row_sq / col_sq;
//   fo_factor_mean_square (a thread per row or column factor): the tiles' sums added in
//       strip or row-tile order, divided by the count;
//   fo_factored_row_means (a block per entry of `means`): each matrix's mean of its new
//       row factors, stored for each of its rows in row_norm.
// Everything is summed in float64 in a fixed order: no atomics, the same result every run.
// Blocks have at most FO_SEGMENT_BLOCK threads (the shared arrays' size).
#pragma once
#include "common.cuh"
#include "signature.cuh"

// The machine epsilon of the params' format (torch's finfo(dtype).eps: eps1=None).
template <typename T>
struct FormatEps {
    static constexpr double value = 1.1920928955078125e-07;  // float32
};
#if defined(__CUDACC__)
template <>
struct FormatEps<__half> {
    static constexpr double value = 0.0009765625;
};
template <>
struct FormatEps<__nv_bfloat16> {
    static constexpr double value = 0.0078125;
};
#endif

template <typename T>
FO_D void fo_factored_tile_sums(const T* grads, double factor, const long long* segments,
                                const long long* layout, const long long* fold,
                                const long long* tiles, double* row_sq, double* col_sq,
                                double* tile_row_sums, double* tile_col_sums) {
    __shared__ double col_part[FO_SEGMENT_BLOCK / 32 * FO_TILE_COLS];  // per warp (16 KB)
    const long long* tile = tiles + 5 * (long long)blockIdx.x;
    const long long s = tile[0], first = tile[1], stop = tile[2], col0 = tile[3];
    const long long offset = segments[6 * s], rows = segments[6 * s + 2];
    const long long cols = segments[6 * s + 3];
    const unsigned threads = blockDim.x, tid = threadIdx.x;
    if (col0 < 0) {  // the small matrices [first, stop), a thread each, whole
        const long long ra = layout[3 * s], ca = layout[3 * s + 1];
        for (long long b = first + tid; b < stop; b += threads) {
            const T* m = grads + offset + b * rows * cols;
            for (long long r = 0; r < rows; ++r) {
                double sum = 0.0;
                for (long long c = 0; c < cols; ++c) {
                    const double x = factor * (double)to_float(m[r * cols + c]);
                    sum += x * x;
                }
                row_sq[ra + b * rows + r] = sum;
            }
            for (long long c = 0; c < cols; ++c) {
                double sum = 0.0;
                for (long long r = 0; r < rows; ++r) {
                    const double x = factor * (double)to_float(m[r * cols + c]);
                    sum += x * x;
                }
                col_sq[ca + b * cols + c] = sum;
            }
        }
        return;
    }
    // rows [first, stop) x the strip's w columns from col0, a warp per row (its lanes along
    // the row: coalesced): each lane adds its columns' squares into the warp's column sums
    // (shared, a lane's own columns) and its row sum, which the warp then adds by shuffles.
    // No barrier inside the loop; every warp takes the same number of rows (rows past the
    // tile count zero) so that the shuffles line up. Column sums: the warps' in warp order.
    const long long row_sums_at = fold[4 * s], strips = fold[4 * s + 1];
    const long long col_sums_at = fold[4 * s + 2], row_tiles = fold[4 * s + 3];
    const long long strip = col0 / FO_TILE_COLS;
    const unsigned w = (unsigned)(cols - col0 < FO_TILE_COLS ? cols - col0 : FO_TILE_COLS);
    // (blocks of a multiple of 32 threads, or of a power of two below 32 in the host tests:
    // a warp's shuffles stay inside it)
    const unsigned lanes = threads < 32 ? threads : 32;
    const unsigned warp = tid / lanes, lane = tid - warp * lanes, warps = threads / lanes;
    double* mine = col_part + warp * FO_TILE_COLS;
    for (unsigned c = lane; c < w; c += lanes) mine[c] = 0.0;
    const long long count = stop - first, trips = (count + warps - 1) / warps;
    for (long long t = 0; t < trips; ++t) {
        const long long k = warp + t * warps;
        double sum = 0.0;
        if (k < count) {
            const T* row = grads + offset + (first + k) * cols + col0;
            for (unsigned c = lane; c < w; c += lanes) {
                const double x = factor * (double)to_float(row[c]);
                sum += x * x;
                mine[c] += x * x;
            }
        }
        for (unsigned o = lanes / 2; o > 0; o /= 2) sum += fo_shfl_xor(sum, o);
        if (k < count && lane == 0) {
            tile_row_sums[row_sums_at + (first + k) * strips + strip] = sum;
        }
    }
    __syncthreads();
    const long long b = first / rows;
    double* out = tile_col_sums + col_sums_at + (b * row_tiles + tile[4]) * cols + col0;
    for (unsigned c = tid; c < w; c += threads) {
        double sum = 0.0;
        for (unsigned v = 0; v < warps; ++v) sum += col_part[v * FO_TILE_COLS + c];
        out[c] = sum;
    }
}

// The tensor whose factor entries hold x: the last s with at[3 s] <= x (`at`: a column of
// `layout`; the offsets never decrease, and a tensor after the owner starts past x).
FO_D long long fo_factor_owner(const long long* at, long long n_segments, long long x) {
    long long lo = 0, hi = n_segments - 1;
    while (lo < hi) {
        const long long mid = (lo + hi + 1) / 2;
        if (at[3 * mid] <= x) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// Factor entry x of [0, n_rows + n_cols) (rows first, then columns): its sum of g^2 (the
// tiles' partial sums added in strip or row-tile order, stored to row_sq / col_sq; small
// matrices' are there already) divided by the count it averages (0 for an empty one), as
// float32. Sets is_row and the entry's index in row_var or col_var.
FO_D float fo_factor_mean_square(const long long* segments, const long long* layout,
                                 long long n_segments, const long long* fold, double* row_sq,
                                 double* col_sq, const double* tile_row_sums,
                                 const double* tile_col_sums, long long n_rows, long long x,
                                 bool& is_row, long long& index) {
    is_row = x < n_rows;
    if (is_row) {
        const long long s = fo_factor_owner(layout, n_segments, x);
        const long long q = x - layout[3 * s], strips = fold[4 * s + 1];
        const long long cols = segments[6 * s + 3];
        index = x;
        if (strips > 0) {
            double sum = 0.0;
            const double* part = tile_row_sums + fold[4 * s] + q * strips;
            for (long long k = 0; k < strips; ++k) sum += part[k];
            row_sq[x] = sum;
        }
        return cols ? (float)(row_sq[x] / (double)cols) : 0.0f;
    }
    const long long y = x - n_rows;
    const long long s = fo_factor_owner(layout + 1, n_segments, y);
    const long long rows = segments[6 * s + 2], cols = segments[6 * s + 3];
    const long long k = y - layout[3 * s + 1], row_tiles = fold[4 * s + 3];
    index = y;
    if (row_tiles > 0) {
        const long long b = k / cols, c = k - b * cols;
        const double* part = tile_col_sums + fold[4 * s + 2] + b * row_tiles * cols + c;
        double sum = 0.0;
        for (long long t = 0; t < row_tiles; ++t) sum += part[t * cols];
        col_sq[y] = sum;
    }
    return rows ? (float)(col_sq[y] / (double)rows) : 0.0f;
}

// A block per entry of `means` (segment, first matrix, stop matrix): each matrix's mean of
// its row factors (float64, then float32) into row_norm for each of its rows; a thread per
// matrix of at most FO_MEAN_THREAD_ROWS rows (its rows in order), a block per larger one
// (each thread's rows, then the threads' sums in order).
FO_D void fo_factored_row_means(const long long* segments, const long long* layout,
                                const long long* means, const float* row_var,
                                float* row_norm) {
    __shared__ double part[FO_SEGMENT_BLOCK];
    __shared__ float mean;
    const long long* entry = means + 3 * (long long)blockIdx.x;
    const long long s = entry[0], first = entry[1], stop = entry[2];
    const long long rows = segments[6 * s + 2], ra = layout[3 * s];
    const unsigned threads = blockDim.x, tid = threadIdx.x;
    if (rows <= FO_MEAN_THREAD_ROWS) {
        for (long long b = first + tid; b < stop; b += threads) {
            double sum = 0.0;
            for (long long r = 0; r < rows; ++r) sum += row_var[ra + b * rows + r];
            const float m = (float)(sum / (double)rows);
            for (long long r = 0; r < rows; ++r) row_norm[ra + b * rows + r] = m;
        }
        return;
    }
    const long long at = ra + first * rows;
    double sum = 0.0;
    for (long long r = tid; r < rows; r += threads) sum += row_var[at + r];
    part[tid] = sum;
    __syncthreads();
    if (tid == 0) {
        double total = 0.0;
        for (unsigned t = 0; t < threads; ++t) total += part[t];
        mean = (float)(total / (double)rows);
    }
    __syncthreads();
    for (long long r = tid; r < rows; r += threads) row_norm[at + r] = mean;
}

// Where the elements of a factored tensor find their factors: each its row's value and mean,
// its column's value (the tensor's offset, shape and layout offsets, read once per chunk).
struct FoFactorWalk {
    long long offset, rows, cols, ra, ca, batch;

    // a / b for the non-negative indices here: 32-bit when both fit (far cheaper on a GPU)
    FO_D static long long quotient(long long a, long long b) {
        if (a < 4294967296LL && b < 4294967296LL) return (long long)((unsigned)a / (unsigned)b);
        return a / b;
    }

    // The factors of the W consecutive elements from i (one row and column found by
    // division, the next by counting: a vector group never leaves its chunk's tensor).
    template <int W>
    FO_D void factors(long long i, const float* row_var, const float* col_var,
                      const float* row_norm, float (&row)[W], float (&col)[W],
                      float (&row_mean)[W]) const {
        long long q = quotient(i - offset, cols);
        long long c = i - offset - q * cols;
        long long matrix = batch > 1 ? quotient(q, rows) : 0;
        long long r = q - matrix * rows;
#pragma unroll
        for (int j = 0; j < W; ++j) {
            if (j > 0 && ++c == cols) {
                c = 0;
                ++q;
                if (++r == rows) {
                    r = 0;
                    ++matrix;
                }
            }
            row[j] = row_var[ra + q];
            row_mean[j] = row_norm[ra + q];
            col[j] = col_var[ca + matrix * cols + c];
        }
    }
};

"""C source of the CPU fast path's kernels (built by :mod:`stages.nersemble.fast` on first use).

Plain C99 + OpenMP with no torch headers: it builds in about a second, where a torch C++ extension takes a
minute, and it is called through ctypes on the tensors' data pointers. Each kernel has a torch twin that
the tests hold it against (values and gradients): :class:`stages.nersemble.hash_encoding.TorchHashEnsemble`.

The hash ensemble, fused: for each sample and level, the 8 cell corners' table rows are found (tcnn's dense
indexing with wrap-around, or its coherent prime hash) and trilinearly interpolated, and the K grids' features
are blended with the sample's weights at once, so nothing of size [L, N, 8] or [L, N, K*F] ever reaches memory.
Arithmetic follows the twin's order (corner weights wx * (wy * wz), corners accumulated x slowest, z fastest,
grids blended after interpolation), so values agree to float32 rounding.
"""

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <string.h>

#define MAXW 256  /* K*F columns at most (the paper config has 64) */

static inline void corner_rows(const float *x, int n_dense_flag, float scale, int64_t res, int64_t size,
                               int64_t offset, int64_t rows[8], float frac[3]) {
    int64_t c[3];
    for (int a = 0; a < 3; ++a) {
        float pos = x[a] * scale + 0.5f;
        float cell = floorf(pos);
        frac[a] = pos - cell;
        c[a] = (int64_t)cell;
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            for (int k = 0; k < 2; ++k) {
                uint32_t idx;
                if (n_dense_flag) {
                    uint32_t r = (uint32_t)res;
                    idx = (uint32_t)(c[0] + i) + (uint32_t)(c[1] + j) * r + (uint32_t)(c[2] + k) * (r * r);
                    idx = (uint32_t)((uint64_t)idx % (uint64_t)size);
                } else {
                    idx = ((uint32_t)(c[0] + i)) ^ ((uint32_t)(c[1] + j) * 2654435761u)
                          ^ ((uint32_t)(c[2] + k) * 805459861u);
                    idx &= (uint32_t)(size - 1);
                }
                rows[i * 4 + j * 2 + k] = offset + (int64_t)idx;
            }
}

static inline void corner_weights(const float f[3], float w[8], float dw[3][8]) {
    float ax[2] = {1.0f - f[0], f[0]}, ay[2] = {1.0f - f[1], f[1]}, az[2] = {1.0f - f[2], f[2]};
    static const float sgn[2] = {-1.0f, 1.0f};
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            for (int k = 0; k < 2; ++k) {
                int c = i * 4 + j * 2 + k;
                w[c] = ax[i] * (ay[j] * az[k]);
                if (dw) {
                    dw[0][c] = sgn[i] * (ay[j] * az[k]);
                    dw[1][c] = sgn[j] * (ax[i] * az[k]);
                    dw[2][c] = sgn[k] * (ax[i] * ay[j]);
                }
            }
}

/* out[n, l*F + f] = sum_k blend[n, k] * sum_c w_c table[row_c, k*F + f] */
void hash_forward(const float *x, const float *blend, const float *table, int64_t n, int n_levels, int n_grids,
                  int feats, const float *scales, const int64_t *res, const int64_t *sizes, const int64_t *offsets,
                  int n_dense, float *out, int n_threads) {
    const int width = n_grids * feats;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t p = 0; p < n; ++p) {
        int64_t rows[8];
        float frac[3], w[8], acc[MAXW];
        for (int l = 0; l < n_levels; ++l) {
            corner_rows(x + 3 * p, l < n_dense, scales[l], res[l], sizes[l], offsets[l], rows, frac);
            corner_weights(frac, w, 0);
            for (int col = 0; col < width; ++col) acc[col] = 0.0f;
            for (int c = 0; c < 8; ++c) {
                const float *row = table + rows[c] * width;
                for (int col = 0; col < width; ++col) acc[col] += w[c] * row[col];
            }
            for (int f = 0; f < feats; ++f) {
                float s = 0.0f;
                for (int k = 0; k < n_grids; ++k) s += acc[k * feats + f] * blend[p * n_grids + k];
                out[p * n_levels * feats + l * feats + f] = s;
            }
        }
    }
}

/* Gradients for x [N, 3] and blend [N, K] (parallel over samples), then the table's (serial: deterministic). */
void hash_backward(const float *x, const float *blend, const float *table, const float *grad_out, int64_t n,
                   int n_levels, int n_grids, int feats, const float *scales, const int64_t *res,
                   const int64_t *sizes, const int64_t *offsets, int n_dense, float *grad_x, float *grad_blend,
                   float *grad_table, int n_threads) {
    const int width = n_grids * feats;
    if (grad_x || grad_blend) {
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t p = 0; p < n; ++p) {
            int64_t rows[8];
            float frac[3], w[8], dw[3][8], gi[MAXW], gx[3] = {0.0f, 0.0f, 0.0f}, gb[MAXW];
            for (int k = 0; k < n_grids; ++k) gb[k] = 0.0f;
            for (int l = 0; l < n_levels; ++l) {
                corner_rows(x + 3 * p, l < n_dense, scales[l], res[l], sizes[l], offsets[l], rows, frac);
                corner_weights(frac, w, dw);
                const float *g = grad_out + p * n_levels * feats + l * feats;
                for (int k = 0; k < n_grids; ++k)
                    for (int f = 0; f < feats; ++f) gi[k * feats + f] = g[f] * blend[p * n_grids + k];
                float gf[3] = {0.0f, 0.0f, 0.0f};
                for (int c = 0; c < 8; ++c) {
                    const float *row = table + rows[c] * width;
                    float dot = 0.0f;
                    for (int col = 0; col < width; ++col) dot += row[col] * gi[col];
                    for (int a = 0; a < 3; ++a) gf[a] += dw[a][c] * dot;
                    if (grad_blend)
                        for (int k = 0; k < n_grids; ++k)
                            for (int f = 0; f < feats; ++f) gb[k] += w[c] * row[k * feats + f] * g[f];
                }
                for (int a = 0; a < 3; ++a) gx[a] += gf[a] * scales[l];
            }
            if (grad_x)
                for (int a = 0; a < 3; ++a) grad_x[3 * p + a] = gx[a];
            if (grad_blend)
                for (int k = 0; k < n_grids; ++k) grad_blend[p * n_grids + k] = gb[k];
        }
    }
    if (grad_table) {
        for (int64_t p = 0; p < n; ++p) {
            int64_t rows[8];
            float frac[3], w[8], gi[MAXW];
            for (int l = 0; l < n_levels; ++l) {
                corner_rows(x + 3 * p, l < n_dense, scales[l], res[l], sizes[l], offsets[l], rows, frac);
                corner_weights(frac, w, 0);
                const float *g = grad_out + p * n_levels * feats + l * feats;
                for (int k = 0; k < n_grids; ++k)
                    for (int f = 0; f < feats; ++f) gi[k * feats + f] = g[f] * blend[p * n_grids + k];
                for (int c = 0; c < 8; ++c) {
                    float *row = grad_table + rows[c] * width;
                    for (int col = 0; col < width; ++col) row[col] += w[c] * gi[col];
                }
            }
        }
    }
}
"""

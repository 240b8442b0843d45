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
/* --- the whole no-grad query: deformation, encoding, density and colour MLPs, per sample -------------- */

/* out = act(in @ W + b), W stored [n_in][n_out] so the inner loop runs over outputs; act 1 = ReLU.
   Common widths get a compile-time trip count (fully vectorised, no alias checks per input). */
#define DENSE_FIXED(N)                                                                                   \
    static inline void dense##N(const float *restrict in, int n_in, const float *restrict W,               \
                                const float *restrict b, float *restrict out) {                            \
        float acc[N];                                                                                      \
        for (int o = 0; o < N; ++o) acc[o] = b ? b[o] : 0.0f;                                              \
        for (int i = 0; i < n_in; ++i) {                                                                   \
            const float xi = in[i];                                                                        \
            const float *restrict w = W + (int64_t)i * N;                                                  \
            for (int o = 0; o < N; ++o) acc[o] += xi * w[o];                                               \
        }                                                                                                  \
        for (int o = 0; o < N; ++o) out[o] = acc[o];                                                       \
    }
DENSE_FIXED(16)
DENSE_FIXED(32)
DENSE_FIXED(64)
DENSE_FIXED(128)

static inline void dense(const float *restrict in, int n_in, const float *restrict W, const float *restrict b,
                         int n_out, int act, float *restrict out) {
    if (n_out == 16) dense16(in, n_in, W, b, out);
    else if (n_out == 32) dense32(in, n_in, W, b, out);
    else if (n_out == 64) dense64(in, n_in, W, b, out);
    else if (n_out == 128) dense128(in, n_in, W, b, out);
    else {
        for (int o = 0; o < n_out; ++o) out[o] = b ? b[o] : 0.0f;
        for (int i = 0; i < n_in; ++i) {
            const float xi = in[i];
            const float *restrict w = W + (int64_t)i * n_out;
            for (int o = 0; o < n_out; ++o) out[o] += xi * w[o];
        }
    }
    if (act == 1)
        for (int o = 0; o < n_out; ++o) out[o] = out[o] > 0.0f ? out[o] : 0.0f;
}

static inline void cross3(const float a[3], const float b[3], float out[3]) {
    out[0] = a[1] * b[2] - a[2] * b[1];
    out[1] = a[2] * b[0] - a[0] * b[2];
    out[2] = a[0] * b[1] - a[1] * b[0];
}

#define MAXH 1024  /* widest layer input or output */

/* spec (int64): [0] deformation on, [1] n_freq, [2] include_input, [3] code_dim, [4] n_layers,
   [5] offset_units "box", [6..9] translation head w, b and rotation head w, b (offsets into params),
   [10] unused, then 5 values per deformation layer (in, out, w, b, skip), then the number of density layers
   and 5 values each (in, out, w, b, act), then the colour layers likewise. b < 0: no bias. The density
   MLP's input is the encoding's L*F features as they are; the colour MLP's is cat((d + 1) / 2, geo) padded
   with ones to its first layer's width (field.pad_with_ones).
   fparams: box min[3], box max[3], exp-map eps. */
void query_forward(const float *positions, const float *directions, const float *codes, const float *blend,
                   const float *pe_window, int64_t n, const int64_t *spec, const float *params,
                   const float *fparams, const float *table, int n_levels, int n_grids, int feats,
                   const float *scales, const int64_t *res, const int64_t *sizes, const int64_t *offsets,
                   int n_dense, float *sigma_out, float *rgb_out, float *offset_out, float *geo_out,
                   int n_threads) {
    const int deform = (int)spec[0], n_freq = (int)spec[1], include_input = (int)spec[2];
    const int code_dim = (int)spec[3], n_def = (int)spec[4], box_units = (int)spec[5];
    const int64_t *def_layers = spec + 11;
    const int64_t *dens = def_layers + 5 * n_def;
    const int n_dens = (int)dens[0];
    const int64_t *col = dens + 1 + 5 * n_dens;
    const int n_col = (int)col[0];
    const float *lo = fparams, *hi = fparams + 3;
    const float eps = fparams[6];
    const int width = n_grids * feats;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t p = 0; p < n; ++p) {
        float inputs[MAXH], a[MAXH], b[MAXH], canon[3], delta[3] = {0.0f, 0.0f, 0.0f};
        const float *pos = positions + 3 * p;
        float ext[3], xn[3];
        for (int k = 0; k < 3; ++k) { ext[k] = hi[k] - lo[k]; xn[k] = (pos[k] - lo[k]) / ext[k]; }
        if (deform) {
            int m = 0;
            float u[3];
            for (int k = 0; k < 3; ++k) u[k] = 6.2831854820251465f * xn[k];  /* float32(2 pi) */
            for (int s = 0; s < 2; ++s)
                for (int k = 0; k < 3; ++k)
                    for (int f = 0; f < n_freq; ++f) {
                        float v = u[k] * (float)(1 << f);
                        float e = s == 0 ? sinf(v) : sinf(v + 1.5707963705062866f);
                        inputs[m++] = e * pe_window[k * n_freq + f];
                    }
            if (include_input) for (int k = 0; k < 3; ++k) inputs[m++] = u[k];
            for (int c = 0; c < code_dim; ++c) inputs[m++] = codes[p * code_dim + c];
            const int n_inputs = m;
            float *h = a, *next = b;
            int h_dim = n_inputs;
            memcpy(h, inputs, sizeof(float) * n_inputs);
            for (int l = 0; l < n_def; ++l) {
                const int64_t *L = def_layers + 5 * l;
                if (L[4]) {  /* skip connection: cat(inputs, h) */
                    memmove(h + n_inputs, h, sizeof(float) * h_dim);
                    memcpy(h, inputs, sizeof(float) * n_inputs);
                    h_dim += n_inputs;
                }
                dense(h, h_dim, params + L[2], L[3] >= 0 ? params + L[3] : 0, (int)L[1], 1, next);
                h_dim = (int)L[1];
                float *t = h; h = next; next = t;
            }
            float v[3], r[3];
            dense(h, h_dim, params + spec[6], spec[7] >= 0 ? params + spec[7] : 0, 3, 0, v);
            dense(h, h_dim, params + spec[8], spec[9] >= 0 ? params + spec[9] : 0, 3, 0, r);
            float theta = sqrtf(fmaxf(r[0] * r[0] + r[1] * r[1] + r[2] * r[2], eps));
            float sn = sinf(theta), cs = cosf(theta);
            float ca = sn / theta, cb = (1.0f - cs) / (theta * theta), cc = (theta - sn) / (theta * theta * theta);
            float rx[3], rrx[3], rv[3], rrv[3], warped;
            cross3(r, xn, rx); cross3(r, rx, rrx); cross3(r, v, rv); cross3(r, rv, rrv);
            for (int k = 0; k < 3; ++k) {
                warped = xn[k] + ca * rx[k] + cb * rrx[k] + (v[k] + cb * rv[k] + cc * rrv[k]);
                if (isnan(warped)) warped = xn[k];
                delta[k] = warped - xn[k];
                if (box_units) delta[k] *= ext[k];
                canon[k] = pos[k] + delta[k];
            }
        } else {
            for (int k = 0; k < 3; ++k) canon[k] = pos[k];
        }
        /* the field: box-normalise (0 outside the open unit cube), encode, density MLP, colour MLP */
        float x[3];
        int inside = 1;
        for (int k = 0; k < 3; ++k) {
            x[k] = (canon[k] - lo[k]) / (hi[k] - lo[k]);
            inside &= (x[k] > 0.0f) & (x[k] < 1.0f);
        }
        if (!inside) x[0] = x[1] = x[2] = 0.0f;
        float *h = a, *next = b;
        for (int l = 0; l < n_levels; ++l) {
            int64_t rows[8];
            float frac[3], w[8], acc[MAXW];
            corner_rows(x, l < n_dense, scales[l], res[l], sizes[l], offsets[l], rows, frac);
            corner_weights(frac, w, 0);
            for (int q = 0; q < width; ++q) acc[q] = 0.0f;
            for (int c = 0; c < 8; ++c) {
                const float *row = table + rows[c] * width;
                for (int q = 0; q < width; ++q) acc[q] += w[c] * row[q];
            }
            for (int f = 0; f < feats; ++f) {
                float s = 0.0f;
                for (int k = 0; k < n_grids; ++k) s += acc[k * feats + f] * blend[p * n_grids + k];
                h[l * feats + f] = s;
            }
        }
        int h_dim = n_levels * feats;
        for (int l = 0; l < n_dens; ++l) {
            const int64_t *L = dens + 1 + 5 * l;
            dense(h, h_dim, params + L[2], L[3] >= 0 ? params + L[3] : 0, (int)L[1], (int)L[4], next);
            h_dim = (int)L[1];
            float *t = h; h = next; next = t;
        }
        sigma_out[p] = inside ? expf(h[0]) : 0.0f;
        if (offset_out) for (int k = 0; k < 3; ++k) offset_out[3 * p + k] = delta[k];
        if (geo_out) for (int q = 1; q < h_dim; ++q) geo_out[p * (h_dim - 1) + q - 1] = h[q];
        if (rgb_out) {
            const float *d = directions + 3 * p;
            for (int q = h_dim - 1; q >= 1; --q) h[q + 2] = h[q];  /* cat((d + 1) / 2, geo) in place */
            for (int k = 0; k < 3; ++k) h[k] = (d[k] + 1.0f) / 2.0f;
            int g_dim = h_dim + 2;
            /* pad_with_ones: the first layer may be wider (tcnn's padding to a multiple of 16); the extra inputs
               are constant ones, so the same weights see the same values as in the eager field */
            const int c_in = n_col > 0 ? (int)col[1] : g_dim;
            for (int q = g_dim; q < c_in; ++q) h[q] = 1.0f;
            if (c_in > g_dim) g_dim = c_in;
            for (int l = 0; l < n_col; ++l) {
                const int64_t *L = col + 1 + 5 * l;
                dense(h, g_dim, params + L[2], L[3] >= 0 ? params + L[3] : 0, (int)L[1], (int)L[4], next);
                g_dim = (int)L[1];
                float *t = h; h = next; next = t;
            }
            for (int k = 0; k < 3; ++k) rgb_out[3 * p + k] = 1.0f / (1.0f + expf(-h[k]));
        }
    }
}
/* --- ray marching through the occupancy grid ------------------------------------------------------------ */

/* Sample j of ray i sits at t_start = t0 + (k_first + j) step; it is kept when its midpoint's cell is
   occupied. Pass 1 (fill == 0) counts the kept samples per ray; pass 2 writes them at out_first[i]. */
void march(const float *o, const float *d, const float *t0, const int64_t *k_first, const int64_t *count,
           int64_t n_rays, float step, const float *aabb, const uint8_t *occ, int r0, int r1, int r2, int fill,
           int64_t *kept, const int64_t *out_first, int64_t *ray_indices, float *t_starts, float *t_ends,
           int n_threads) {
    const float ext[3] = {aabb[3] - aabb[0], aabb[4] - aabb[1], aabb[5] - aabb[2]};
    const int64_t res[3] = {r0, r1, r2};
    #pragma omp parallel for num_threads(n_threads) schedule(dynamic, 64)
    for (int64_t i = 0; i < n_rays; ++i) {
        int64_t m = 0, at = fill ? out_first[i] : 0;
        for (int64_t j = 0; j < count[i]; ++j) {
            const float ts = t0[i] + (float)(k_first[i] + j) * step;
            const float te = ts + step;
            const float tm = 0.5f * (ts + te);
            int64_t c[3];
            for (int a = 0; a < 3; ++a) {
                const float unit = (o[3 * i + a] + d[3 * i + a] * tm - aabb[a]) / ext[a];
                int64_t v = (int64_t)(unit * (float)res[a]);
                v = v < 0 ? 0 : v;
                c[a] = v < res[a] - 1 ? v : res[a] - 1;
            }
            if (!occ[(c[0] * r1 + c[1]) * r2 + c[2]]) continue;
            if (fill) {
                ray_indices[at + m] = i;
                t_starts[at + m] = ts;
                t_ends[at + m] = te;
            }
            ++m;
        }
        if (!fill) kept[i] = m;
    }
}
"""

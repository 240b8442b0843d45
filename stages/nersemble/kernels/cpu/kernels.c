/* The CPU fast path's kernels, built by build.py on first use and called through ctypes (ops.py).
 *
 * Plain C99 + OpenMP with no torch headers: it builds in about a second, where a torch C++ extension takes a
 * minute, and it works on the tensors' data pointers. Each kernel has a torch twin the tests hold it against
 * (values and gradients); ops.py names the twin of each.
 *
 * The hash ensemble, fused: for each sample and level, the 8 cell corners' table rows are found (tcnn's dense
 * indexing with wrap-around, or its coherent prime hash) and trilinearly interpolated, and the K grids' features
 * are blended with the sample's weights at once, so nothing of size [L, N, 8] or [L, N, K*F] reaches memory.
 * Arithmetic follows the twin's order (corner weights wx * (wy * wz), corners accumulated x slowest, z fastest,
 * grids blended after interpolation), so values agree to float32 rounding.
 */
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
                    if (idx >= (uint32_t)size) idx %= (uint32_t)size;  /* rarely taken: a 32-bit division only then */
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

#define GROUP 4   /* samples whose table rows are found and prefetched before any is read */
#define MAXL 32   /* levels at most (the paper config has 16) */

/* Phase 2 of encode_group for 2 features per level and W = K*2 columns, a multiple of 8 known at compile time,
   written with GCC/Clang vector types: gcc left the run-time-width loops scalar (~1000 cycles a sample). The
   same products and sums per column as the generic loop, so the same values. */
typedef float v8f __attribute__((vector_size(32)));
#define READ_ROWS(W)                                                                                          \
    static inline void read_rows_##W(int gn, int n_levels, const float *table, int64_t rows[GROUP][MAXL][8],   \
                                      float frac[GROUP][MAXL][3], const float *blend, float *out) {             \
        for (int q = 0; q < gn; ++q)                                                                        \
            for (int l = 0; l < n_levels; ++l) {                                                            \
                float w[8], acc_s[W];                                                                       \
                v8f acc[W / 8];                                                                             \
                corner_weights(frac[q][l], w, 0);                                                           \
                for (int j = 0; j < W / 8; ++j) acc[j] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};                     \
                for (int c = 0; c < 8; ++c) {                                                               \
                    const float *row = table + rows[q][l][c] * W;                                           \
                    for (int j = 0; j < W / 8; ++j) {                                                       \
                        v8f r;                                                                              \
                        memcpy(&r, row + 8 * j, sizeof r);                                                  \
                        acc[j] += w[c] * r;                                                                 \
                    }                                                                                       \
                }                                                                                           \
                memcpy(acc_s, acc, sizeof acc_s);                                                           \
                for (int f = 0; f < 2; ++f) {                                                               \
                    float s = 0.0f;                                                                         \
                    for (int k = 0; k < W / 2; ++k) s += acc_s[k * 2 + f] * blend[q * (W / 2) + k];         \
                    out[q * n_levels * 2 + l * 2 + f] = s;                                                  \
                }                                                                                           \
            }                                                                                               \
    }
READ_ROWS(8)
READ_ROWS(16)
READ_ROWS(64)

/* Encode `gn` <= GROUP samples at box-normalised positions x[q] with blend rows blend[q * n_grids ...]:
   first every corner row of every level of every sample is found and prefetched, then they are read. The
   rows are scattered over a table of megabytes, so reading them one after the other waits on each miss in
   turn; prefetching them all first overlaps those waits. out[q * L*F + l*F + f]. */
static inline void encode_group(const float x[][3], int gn, const float *blend, const float *table, int n_levels,
                                int n_grids, int feats, const float *scales, const int64_t *res,
                                const int64_t *sizes, const int64_t *offsets, int n_dense, float *out) {
    const int width = n_grids * feats;
    int64_t rows[GROUP][MAXL][8];
    float frac[GROUP][MAXL][3];
    for (int q = 0; q < gn; ++q)
        for (int l = 0; l < n_levels; ++l) {
            corner_rows(x[q], l < n_dense, scales[l], res[l], sizes[l], offsets[l], rows[q][l], frac[q][l]);
            for (int c = 0; c < 8; ++c) __builtin_prefetch(table + rows[q][l][c] * width, 0, 1);
        }
    if (feats == 2 && width == 8) read_rows_8(gn, n_levels, table, rows, frac, blend, out);
    else if (feats == 2 && width == 16) read_rows_16(gn, n_levels, table, rows, frac, blend, out);
    else if (feats == 2 && width == 64) read_rows_64(gn, n_levels, table, rows, frac, blend, out);
    else
        for (int q = 0; q < gn; ++q)
            for (int l = 0; l < n_levels; ++l) {
                float w[8], acc[MAXW];
                corner_weights(frac[q][l], w, 0);
                for (int col = 0; col < width; ++col) acc[col] = 0.0f;
                for (int c = 0; c < 8; ++c) {
                    const float *row = table + rows[q][l][c] * width;
                    for (int col = 0; col < width; ++col) acc[col] += w[c] * row[col];
                }
                for (int f = 0; f < feats; ++f) {
                    float s = 0.0f;
                    for (int k = 0; k < n_grids; ++k) s += acc[k * feats + f] * blend[q * n_grids + k];
                    out[q * n_levels * feats + l * feats + f] = s;
                }
            }
}

/* out[n, l*F + f] = sum_k blend[n, k] * sum_c w_c table[row_c, k*F + f] */
void hash_forward(const float *x, const float *blend, const float *table, int64_t n, int n_levels, int n_grids,
                  int feats, const float *scales, const int64_t *res, const int64_t *sizes, const int64_t *offsets,
                  int n_dense, float *out, int n_threads) {
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t g = 0; g < n; g += GROUP) {
        const int gn = n - g < GROUP ? (int)(n - g) : GROUP;
        float xs[GROUP][3];
        for (int q = 0; q < gn; ++q)
            for (int a = 0; a < 3; ++a) xs[q][a] = x[3 * (g + q) + a];
        encode_group(xs, gn, blend + g * n_grids, table, n_levels, n_grids, feats, scales, res, sizes, offsets,
                     n_dense, out + g * n_levels * feats);
    }
}

/* Finds and prefetches every corner row of `gn` <= GROUP samples (table rows to read, and with grad_table the
   rows their gradient is added to), as encode_group does: the misses overlap instead of waiting in turn. */
static inline void find_rows(const float *x, int gn, const float *table, float *grad_table, int width, int n_levels,
                             const float *scales, const int64_t *res, const int64_t *sizes, const int64_t *offsets,
                             int n_dense, int64_t rows[GROUP][MAXL][8], float frac[GROUP][MAXL][3]) {
    for (int q = 0; q < gn; ++q)
        for (int l = 0; l < n_levels; ++l) {
            corner_rows(x + 3 * q, l < n_dense, scales[l], res[l], sizes[l], offsets[l], rows[q][l], frac[q][l]);
            for (int c = 0; c < 8; ++c) {
                if (table) __builtin_prefetch(table + rows[q][l][c] * width, 0, 1);
                if (grad_table) __builtin_prefetch(grad_table + rows[q][l][c] * width, 1, 1);
            }
        }
}

/* One sample's gradients for x and its blend row (either may be NULL) and, with `scatter`, its share of the
   table's, from its corner rows; the table is read only for the first two. Inlined with constant sizes for the
   preview's 4 grids x 2 features: gcc then unrolls the loops and keeps the blend gradient in registers (at
   run-time sizes each of its sums went through the stack, one store and reload per term). The products and
   sums are the same, in the same order, at any size. */
static inline __attribute__((always_inline)) void backward_sample(
        const int64_t rows[MAXL][8], const float frac[MAXL][3], const float *blend, const float *table,
        const float *grad_out, int n_levels, int n_grids, int feats, int width, const float *scales,
        float *grad_x, float *grad_blend, float *scatter) {
    float w[8], dw[3][8], gi[MAXW], gx[3] = {0.0f, 0.0f, 0.0f}, gb[MAXW];
    for (int k = 0; k < n_grids; ++k) gb[k] = 0.0f;
    for (int l = 0; l < n_levels; ++l) {
        corner_weights(frac[l], w, dw);
        const float *g = grad_out + l * feats;
        for (int k = 0; k < n_grids; ++k)
            for (int f = 0; f < feats; ++f) gi[k * feats + f] = g[f] * blend[k];
        float gf[3] = {0.0f, 0.0f, 0.0f};
        for (int c = 0; c < 8; ++c) {
            if (grad_x || grad_blend) {
                const float *row = table + rows[l][c] * width;
                if (grad_x) {
                    float dot = 0.0f;
                    for (int col = 0; col < width; ++col) dot += row[col] * gi[col];
                    for (int a = 0; a < 3; ++a) gf[a] += dw[a][c] * dot;
                }
                if (grad_blend)
                    for (int k = 0; k < n_grids; ++k)
                        for (int f = 0; f < feats; ++f) gb[k] += w[c] * row[k * feats + f] * g[f];
            }
            if (scatter) {
                float *grow = scatter + rows[l][c] * width;
                for (int col = 0; col < width; ++col) grow[col] += w[c] * gi[col];
            }
        }
        for (int a = 0; a < 3; ++a) gx[a] += gf[a] * scales[l];
    }
    if (grad_x)
        for (int a = 0; a < 3; ++a) grad_x[a] = gx[a];
    if (grad_blend)
        for (int k = 0; k < n_grids; ++k) grad_blend[k] = gb[k];
}

/* backward_sample over every sample, a group of corner rows found and prefetched at a time. */
static void backward_pass(const float *x, const float *blend, const float *table, const float *grad_out, int64_t n,
                          int n_levels, int n_grids, int feats, const float *scales, const int64_t *res,
                          const int64_t *sizes, const int64_t *offsets, int n_dense, float *grad_x,
                          float *grad_blend, float *scatter, int n_threads) {
    const int width = n_grids * feats, lf = n_levels * feats;
    const float *read = (grad_x || grad_blend) ? table : 0;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t p0 = 0; p0 < n; p0 += GROUP) {
        const int gn = n - p0 < GROUP ? (int)(n - p0) : GROUP;
        int64_t rows[GROUP][MAXL][8];
        float frac[GROUP][MAXL][3];
        find_rows(x + 3 * p0, gn, read, scatter, width, n_levels, scales, res, sizes, offsets, n_dense, rows, frac);
        for (int q = 0; q < gn; ++q) {
            const int64_t p = p0 + q;
            float *gxp = grad_x ? grad_x + 3 * p : 0, *gbp = grad_blend ? grad_blend + p * n_grids : 0;
            if (feats == 2 && width == 8)
                backward_sample(rows[q], frac[q], blend + p * n_grids, read, grad_out + p * lf, n_levels, 4, 2, 8,
                                scales, gxp, gbp, scatter);
            else
                backward_sample(rows[q], frac[q], blend + p * n_grids, read, grad_out + p * lf, n_levels, n_grids,
                                feats, width, scales, gxp, gbp, scatter);
        }
    }
}

/* Gradients for x [N, 3] and blend [N, K] (parallel over samples), then the table's (serial: deterministic). */
void hash_backward(const float *x, const float *blend, const float *table, const float *grad_out, int64_t n,
                   int n_levels, int n_grids, int feats, const float *scales, const int64_t *res,
                   const int64_t *sizes, const int64_t *offsets, int n_dense, float *grad_x, float *grad_blend,
                   float *grad_table, int n_threads) {
    const int reads = grad_x || grad_blend;
    /* One thread: the table's gradient is scattered in the same pass, from the same corners, in the same
       order as the separate pass below would (the same sums); threads would race on shared rows. */
    float *const scatter = (n_threads == 1) ? grad_table : 0;
    if (reads)
        backward_pass(x, blend, table, grad_out, n, n_levels, n_grids, feats, scales, res, sizes, offsets, n_dense,
                      grad_x, grad_blend, scatter, n_threads);
    if (grad_table && !(scatter && reads))
        backward_pass(x, blend, table, grad_out, n, n_levels, n_grids, feats, scales, res, sizes, offsets, n_dense,
                      0, 0, grad_table, 1);
}
/* --- the no-grad query's per-sample chain around the MLPs ------------------------------------------------ */

static inline void cross3(const float a[3], const float b[3], float out[3]) {
    out[0] = a[1] * b[2] - a[2] * b[1];
    out[1] = a[2] * b[0] - a[0] * b[2];
    out[2] = a[0] * b[1] - a[1] * b[0];
}

/* R(r) x + V(r) v, the SE(3) exponential of the screw axis (v, r) applied to x (deformation.se3_exp and the
   transform, before the NaN guard): theta = sqrt(max(|r|^2, eps)), R = I + A [r] + B [r]^2,
   V = I + B [r] + C [r]^2 with A = sin/theta, B = (1 - cos)/theta^2, C = (theta - sin)/theta^3. */
static inline void se3_warp_point(const float x[3], const float *v, const float *r, float eps, float out[3]) {
    float theta = sqrtf(fmaxf(r[0] * r[0] + r[1] * r[1] + r[2] * r[2], eps));
    float sn = sinf(theta), cs = cosf(theta);
    float ca = sn / theta, cb = (1.0f - cs) / (theta * theta), cc = (theta - sn) / (theta * theta * theta);
    float rx[3], rrx[3], rv[3], rrv[3];
    cross3(r, x, rx); cross3(r, rx, rrx); cross3(r, v, rv); cross3(r, rv, rrv);
    for (int k = 0; k < 3; ++k) out[k] = x[k] + ca * rx[k] + cb * rrx[k] + (v[k] + cb * rv[k] + cc * rrv[k]);
}

/* SE3DeformationField's warp of box-normalised x [N, 3] by screw axes v, r [N, 3] each, NaN guard included:
   out = R x + V v, or x where that is NaN. */
void se3_warp(const float *x, const float *v, const float *r, int64_t n, float eps, float *out, int n_threads) {
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t p = 0; p < n; ++p) {
        se3_warp_point(x + 3 * p, v + 3 * p, r + 3 * p, eps, out + 3 * p);
        for (int k = 0; k < 3; ++k)
            if (isnan(out[3 * p + k])) out[3 * p + k] = x[3 * p + k];
    }
}

static inline double dot3d(const double a[3], const double b[3]) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; }

static inline void cross3d(const double a[3], const double b[3], double out[3]) {
    out[0] = a[1] * b[2] - a[2] * b[1];
    out[1] = a[2] * b[0] - a[0] * b[2];
    out[2] = a[0] * b[1] - a[1] * b[0];
}

/* Gradients of se3_warp for v, r and (grad_x not NULL) x, from g = dL/dout; in double, since the Rodrigues
   factors' derivatives cancel at small angles. With r x (r x y) = r (r.y) - |r|^2 y, s.out is
   s.x + s.v + A s.(r x x) + B [(s.r)(r.x) - |r|^2 s.x] + B s.(r x v) + C [(s.r)(r.v) - |r|^2 s.v],
   where s is g with the NaN-guarded components zeroed (those pass g to x instead); theta carries r's
   gradient only where |r|^2 >= eps (torch's clamp passes it at equality). */
void se3_warp_backward(const float *x, const float *v, const float *r, const float *grad_out, int64_t n, float eps,
                       float *grad_x, float *grad_v, float *grad_r, int n_threads) {
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t p = 0; p < n; ++p) {
        float raw[3];
        se3_warp_point(x + 3 * p, v + 3 * p, r + 3 * p, eps, raw);
        double s[3], xd[3], vd[3], rd[3], pass[3];
        for (int k = 0; k < 3; ++k) {
            const int guarded = isnan(raw[k]);
            s[k] = guarded ? 0.0 : grad_out[3 * p + k];
            pass[k] = guarded ? grad_out[3 * p + k] : 0.0;
            xd[k] = x[3 * p + k]; vd[k] = v[3 * p + k]; rd[k] = r[3 * p + k];
        }
        const double rr = dot3d(rd, rd);
        const int clamped = rr < (double)eps;
        const double th = sqrt(clamped ? (double)eps : rr), sn = sin(th), cs = cos(th);
        const double th2 = th * th, th3 = th2 * th;
        const double ca = sn / th, cb = (1.0 - cs) / th2, cc = (th - sn) / th3;
        const double da = (th * cs - sn) / th2, db = (th * sn - 2.0 * (1.0 - cs)) / th3;
        const double dc = (1.0 - cs) / th3 - 3.0 * (th - sn) / (th3 * th);
        double rx[3], rv[3], xs[3], vs[3], rs[3];
        cross3d(rd, xd, rx); cross3d(rd, vd, rv); cross3d(xd, s, xs); cross3d(vd, s, vs); cross3d(rd, s, rs);
        const double sr = dot3d(s, rd), sx = dot3d(s, xd), sv = dot3d(s, vd), rxd = dot3d(rd, xd), rvd = dot3d(rd, vd);
        const double g_theta = da * dot3d(s, rx) + db * (sr * rxd - rr * sx + dot3d(s, rv)) + dc * (sr * rvd - rr * sv);
        for (int k = 0; k < 3; ++k) {
            double gr = ca * xs[k] + cb * (s[k] * rxd + xd[k] * sr - 2.0 * rd[k] * sx) + cb * vs[k]
                        + cc * (s[k] * rvd + vd[k] * sr - 2.0 * rd[k] * sv);
            if (!clamped) gr += g_theta * rd[k] / th;
            grad_r[3 * p + k] = (float)gr;
            grad_v[3 * p + k] = (float)(s[k] - cb * rs[k] + cc * (rd[k] * sr - rr * s[k]));
            if (grad_x) grad_x[3 * p + k] = (float)(s[k] - ca * rs[k] + cb * (rd[k] * sr - rr * s[k]) + pass[k]);
        }
    }
}

/* The MLPs run as batched matrix products in torch (far faster than per-sample loops); this kernel does the
   elementwise rest of a sample in one pass: the SE(3) warp from the screw axis vr = [v, r] (deformation.se3_exp,
   the transform and the NaN guard), the offset (paper or box units), the field's box normalisation with its
   inside mask, and the blended hash encoding. vr NULL: no deformation. fparams: box min[3], box max[3], eps.
   Outputs: features [N, L*F], inside [N] (1 or 0), offset [N, 3] (may be NULL). */
void warp_encode(const float *positions, const float *vr, const float *blend, int64_t n, const float *fparams,
                 int box_units, const float *table, int n_levels, int n_grids, int feats, const float *scales,
                 const int64_t *res, const int64_t *sizes, const int64_t *offsets, int n_dense, float *features,
                 float *inside_out, float *offset_out, int n_threads) {
    const float *lo = fparams, *hi = fparams + 3;
    const float eps = fparams[6];
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t g = 0; g < n; g += GROUP) {
        const int gn = n - g < GROUP ? (int)(n - g) : GROUP;
        float xs[GROUP][3];
        for (int q = 0; q < gn; ++q) {
            const int64_t p = g + q;
            const float *pos = positions + 3 * p;
            float canon[3], delta[3] = {0.0f, 0.0f, 0.0f};
            if (vr) {
                float ext[3], xn[3];
                for (int k = 0; k < 3; ++k) { ext[k] = hi[k] - lo[k]; xn[k] = (pos[k] - lo[k]) / ext[k]; }
                float warped[3];
                se3_warp_point(xn, vr + 6 * p, vr + 6 * p + 3, eps, warped);
                for (int k = 0; k < 3; ++k) {
                    if (isnan(warped[k])) warped[k] = xn[k];
                    delta[k] = warped[k] - xn[k];
                    if (box_units) delta[k] *= ext[k];
                    canon[k] = pos[k] + delta[k];
                }
            } else {
                for (int k = 0; k < 3; ++k) canon[k] = pos[k];
            }
            int inside = 1;
            for (int k = 0; k < 3; ++k) {
                xs[q][k] = (canon[k] - lo[k]) / (hi[k] - lo[k]);
                inside &= (xs[q][k] > 0.0f) & (xs[q][k] < 1.0f);
            }
            if (!inside) xs[q][0] = xs[q][1] = xs[q][2] = 0.0f;
            inside_out[p] = inside ? 1.0f : 0.0f;
            if (offset_out) for (int k = 0; k < 3; ++k) offset_out[3 * p + k] = delta[k];
        }
        encode_group(xs, gn, blend + g * n_grids, table, n_levels, n_grids, feats, scales, res, sizes, offsets,
                     n_dense, features + g * n_levels * feats);
    }
}

#define MAXF 16  /* posenc frequencies at most */

/* sin(x) for |x| < ~1e4 in plain float arithmetic the compiler vectorises (libm's sinf is a call per value):
   Cody-Waite reduction by pi/2 in three parts (the first exact in float), then the minimax polynomials of sin and cos on [-pi/4, pi/4].
   Within ~1 ulp of sinf over the posenc's arguments (|x| < 2 pi 2^(n-1)). */
static inline float sin_vec(float x) {
    const float k = rintf(x * 0.636619772367581f);
    float r = x - k * 1.5703125f;  /* 8 significant bits: k * this is exact for |k| < 2^16 */
    r = r - k * 4.837512969970703125e-4f;
    r = r - k * 7.54978995489188216e-8f;
    const float r2 = r * r;
    const float s = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
    const float c = 1.0f - 0.5f * r2 + r2 * r2 * (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f
                                                                           + r2 * 2.443315711809948e-5f));
    const int q = (int)k & 3;
    const float v = (q & 1) ? c : s;
    return (q & 2) ? -v : v;
}

/* deformation.windowed_posenc of the box-normalised positions: out [N, 6 n_freq (+ 3)] = all sines (axis-major,
   each band times its window), then sin(arg + pi/2) likewise (the twin adds pi/2 in float32 before its sine,
   and so does this), then (include_input) u = 2 pi x_n. window: [n_freq] band weights. */
void posenc(const float *positions, int64_t n, const float *fparams, int n_freq, const float *window,
            int include_input, float *out, int n_threads) {
    const float *lo = fparams, *hi = fparams + 3;
    const int width = 6 * n_freq + (include_input ? 3 : 0);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t p = 0; p < n; ++p) {
        float u[3], a[3 * MAXF], b[3 * MAXF], w[3 * MAXF];
        float *o = out + p * width;
        for (int k = 0; k < 3; ++k) u[k] = 6.2831854820251465f * ((positions[3 * p + k] - lo[k]) / (hi[k] - lo[k]));
        for (int k = 0; k < 3; ++k)
            for (int f = 0; f < n_freq; ++f) {
                a[k * n_freq + f] = u[k] * (float)(1 << f);
                w[k * n_freq + f] = window[f];
            }
        const int m = 3 * n_freq;
        for (int j = 0; j < m; ++j) b[j] = a[j] + 1.5707963705062866f;
        for (int j = 0; j < m; ++j) o[j] = sin_vec(a[j]) * w[j];
        for (int j = 0; j < m; ++j) o[m + j] = sin_vec(b[j]) * w[j];
        if (include_input) for (int k = 0; k < 3; ++k) o[2 * m + k] = u[k];
    }
}

/* --- front-to-back visibility (early ray termination) over packed samples ---------------------------------- */

/* The next samples to evaluate: up to `slab` per alive ray, from next[i] on (ray i's samples are
   first[i] .. first[i] + count[i] - 1). Writes their ids and ray ids, in packed order, their midpoints'
   world positions o + d t_mid, their rays' directions and timesteps; advances next[]; returns how many. */
int64_t slab_take(int64_t n_rays, const int64_t *first, const int64_t *count, int64_t *next, const uint8_t *alive,
                  int64_t slab, const float *o, const float *d, const int64_t *timesteps, const float *t_starts,
                  const float *t_ends, int64_t *ids, int64_t *ray_ids, float *positions, float *directions,
                  int64_t *sample_timesteps) {
    int64_t m = 0;
    for (int64_t i = 0; i < n_rays; ++i) {
        if (!alive[i] || next[i] >= count[i]) continue;
        int64_t stop = next[i] + slab < count[i] ? next[i] + slab : count[i];
        for (int64_t j = next[i]; j < stop; ++j, ++m) {
            int64_t s = first[i] + j;
            float tm = 0.5f * (t_starts[s] + t_ends[s]);
            ids[m] = s;
            ray_ids[m] = i;
            for (int a = 0; a < 3; ++a) positions[3 * m + a] = o[3 * i + a] + d[3 * i + a] * tm;
            for (int a = 0; a < 3; ++a) directions[3 * m + a] = d[3 * i + a];
            sample_timesteps[m] = timesteps[i];
        }
        next[i] = stop;
    }
    return m;
}

/* After evaluating those samples (sigma [m]; rgb, offset [m, 3] or NULL): a sample is kept when its alpha
   1 - exp(-tau) >= alpha_threshold and the transmittance before it, exp(-optical depth), >= eps; the ray's
   optical depth (float64) grows by every evaluated tau, and the ray stops once exp(-depth) < eps (eps > 0).
   Kept samples' values are written to the full arrays at their ids. */
void slab_update(int64_t m, const int64_t *ids, const int64_t *ray_ids, const float *sigma, const float *rgb,
                 const float *offset, const float *t_starts, const float *t_ends, float alpha_threshold, double eps,
                 double *optical_depth, uint8_t *alive, uint8_t *keep, float *all_sigma, float *all_rgb,
                 float *all_offset) {
    for (int64_t q = 0; q < m; ++q) {
        const int64_t s = ids[q], i = ray_ids[q];
        const float tau = sigma[q] * (t_ends[s] - t_starts[s]);
        const int visible = (1.0f - expf(-tau)) >= alpha_threshold && exp(-optical_depth[i]) >= eps;
        optical_depth[i] += (double)tau;
        keep[s] = (uint8_t)visible;
        if (visible && all_sigma) {
            all_sigma[s] = sigma[q];
            if (all_rgb) for (int a = 0; a < 3; ++a) all_rgb[3 * s + a] = rgb[3 * q + a];
            if (all_offset) for (int a = 0; a < 3; ++a) all_offset[3 * s + a] = offset[3 * q + a];
        }
    }
    if (eps > 0.0)  /* a ray's samples are consecutive: once per ray */
        for (int64_t q = 0; q < m; ++q)
            if (q + 1 == m || ray_ids[q + 1] != ray_ids[q]) alive[ray_ids[q]] = exp(-optical_depth[ray_ids[q]]) >= eps;
}

/* --- ray marching through the occupancy grid ------------------------------------------------------------ */

/* The grid cell of a box-normalised coordinate, clamped into the grid: the torch twin's index. */
static inline int64_t cell(float unit, int64_t res) {
    const int64_t v = (int64_t)(unit * (float)res);
    return v < 0 ? 0 : (v < res - 1 ? v : res - 1);
}

/* Sample j of ray i sits at t_start = t0 + (k_first + j) step; it is kept when its midpoint's cell is
   occupied. Pass 1 (fill == 0) counts the kept samples per ray and notes the span [first, last] of steps
   they lie in; pass 2 walks only that span and writes them at out_first[i]. */
void march(const float *o, const float *d, const float *t0, const int64_t *k_first, const int64_t *count,
           int64_t n_rays, float step, const float *aabb, const uint8_t *occ, int r0, int r1, int r2, int fill,
           int64_t *kept, int64_t *span, const int64_t *out_first, int64_t *ray_indices, float *t_starts,
           float *t_ends, int n_threads) {
    const float lo[3] = {aabb[0], aabb[1], aabb[2]};
    const float ext[3] = {aabb[3] - aabb[0], aabb[4] - aabb[1], aabb[5] - aabb[2]};
    #pragma omp parallel for num_threads(n_threads) schedule(dynamic, 64)
    for (int64_t i = 0; i < n_rays; ++i) {
        /* the ray in locals: the output stores may alias the inputs, which would reload them every step */
        const float ox = o[3 * i], oy = o[3 * i + 1], oz = o[3 * i + 2];
        const float dx = d[3 * i], dy = d[3 * i + 1], dz = d[3 * i + 2];
        const float start = t0[i];
        const int64_t k0 = k_first[i];
        const int64_t begin = fill ? span[2 * i] : 0, end = fill ? span[2 * i + 1] + 1 : count[i];
        int64_t m = 0, at = fill ? out_first[i] : 0, first = -1, last = -2;
        for (int64_t j = begin; j < end; ++j) {
            const float ts = start + (float)(k0 + j) * step;
            const float te = ts + step;
            const float tm = 0.5f * (ts + te);
            const int64_t cx = cell((ox + dx * tm - lo[0]) / ext[0], r0);
            const int64_t cy = cell((oy + dy * tm - lo[1]) / ext[1], r1);
            const int64_t cz = cell((oz + dz * tm - lo[2]) / ext[2], r2);
            if (!occ[(cx * r1 + cy) * r2 + cz]) continue;
            if (fill) {
                ray_indices[at + m] = i;
                t_starts[at + m] = ts;
                t_ends[at + m] = te;
            }
            if (first < 0) first = j;
            last = j;
            ++m;
        }
        if (!fill) {
            kept[i] = m;
            span[2 * i] = first < 0 ? 0 : first;
            span[2 * i + 1] = last;
        }
    }
}

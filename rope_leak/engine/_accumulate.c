/* Fused per-layer accumulation for rope_leak (CPU, float32 scores).
 *
 * One pass over each query row (b, h, i) of the attention scores:
 *   log Z_i = logsumexp_j s_ij          (float32 result, double partial sum)
 *   for the scored keys j (jlo <= j <= i, qlo <= i < qhi), for the dense targets
 *   y in {pattern = A = exp(s - m) / S, scores = s} selected by the bits of `want`:
 *     diag[i - j] += y, col[j] += y, row[i] += y, sumsq += y*y, cell[fold][c] += y
 *   and the sink score sum_{i >= 1} A[i, 0] / (n - 1).
 * log_pattern = s - log Z and -log Z are not summed here: the caller derives their
 * statistics from the scores' sums and log Z (rope_leak.engine.accumulate).
 * With `window` w > 0 the same pass also gives the start cut's rows
 * (rope_leak.engine.start_cut): log rho_i = LSE over the window keys
 * max(1, i - w + 1) <= j <= i minus log Z_i (-inf for row 0), the profile sums
 * profile[i - j] += exp(s_ij - LSE_window_i) over rows i >= w and keys j >= 1, and the
 * scores' diagonal, column and squared sums of rows sc_lo <= i < sc_hi (the start cut's
 * queries, all scored) go to sc_diag / sc_col / sc_sq instead of the scores slot of
 * diag / col / sumsq (the caller adds them back for the full pairs).
 * Keys after the last finite score (the causal mask's -inf) get exp = 0 without
 * being computed. Every per-prompt value enters a double before it is summed with
 * anything. exp is a vectorisable polynomial (fast_expf, about 1 ulp), so values
 * differ from torch's by float32 rounding only. Built with -fassociative-math (sums
 * vectorise), so never rely on float tricks such as the 1.5 * 2^23 rounding constant
 * here. Loops run head, row, prompt (innermost), so a row of cell sums stays in cache
 * across the batch.
 *
 * Compiled at first use by rope_leak.engine.kernel (the system C compiler, no torch
 * headers) and called through ctypes, which releases the GIL: head ranges [h0, h1) run
 * in parallel threads; every output is indexed by head, so the threads write disjoint
 * parts of the same buffers.
 *
 * On x86-64 Linux with GCC or Clang the function is also built for x86-64-v3 (AVX2,
 * FMA) and the loader picks that clone on CPUs that have it (target_clones): about
 * twice as fast, and the library stays portable to any x86-64 CPU.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static int finite_float(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x7f800000u) != 0x7f800000u;
}


/* exp for float32, vectorisable (Cephes polynomial, about 1 ulp); 0 below -87.3
 * (including -inf: masked keys), NaN in gives NaN out (the clamps keep it), which the caller's finite test of log Z catches. */
static inline float fast_expf(float x) {
    float under = x < -87.3f ? 0.0f : 1.0f;
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.7f ? 88.7f : x;
    float kf = rintf(x * 1.44269504088896341f);
    float r = x - kf * 0.693359375f + kf * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    int32_t k = (int32_t)kf;
    uint32_t bits = (uint32_t)(k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale * under;
}

/* The index of the last finite score of a row of n (0 when there is none, so that row
 * fails the finite test of its log Z). A causal row is finite up to its query i and -inf
 * after it: checked with a vectorised pass over the tail, never a scalar scan. */
static inline int64_t last_finite(const float *s, int64_t i, int64_t n)
{
    if (s[n - 1] != -INFINITY) return n - 1;
    if (i < n - 1 && s[i] != -INFINITY) {
        int masked = 1;
        for (int64_t j = i + 1; j < n; j++) masked &= s[j] == -INFINITY;
        if (masked) return i;
    }
    int64_t last = 0;
#pragma omp simd reduction(max:last)
    for (int64_t j = 0; j < n; j++) last = s[j] != -INFINITY && j > last ? j : last;
    return last;
}

/* The start cut's part of row i (see the header): e[j] = exp(s_j - m) as computed for
 * log Z. The window's mass is read from e when it is not too small against the row's
 * maximum; otherwise (a far stronger key outside the window, e.g. a sink) e has
 * underflowed there and the window is worked out on its own maximum. */
static inline void start_cut_row(const float *s, const float *e, float m, float lz, int64_t i,
                                 int64_t window, double *log_rho, double *profile)
{
    if (i == 0) {
        log_rho[0] = -INFINITY;
        return;
    }
    int64_t lo = i - window + 1 > 1 ? i - window + 1 : 1;
    double mass = 0.0;
    for (int64_t j = lo; j <= i; j++) mass += (double)e[j];
    double lse;
    int direct = mass < 1e-20;
    if (!direct) {
        lse = (double)m + log(mass);
    } else {
        float mw = -INFINITY;
        for (int64_t j = lo; j <= i; j++) mw = s[j] > mw ? s[j] : mw;
        if (mw == -INFINITY) {  /* no finite key in the window */
            log_rho[i] = -INFINITY;
            return;
        }
        double sw = 0.0;
        for (int64_t j = lo; j <= i; j++) sw += (double)fast_expf(s[j] - mw);
        lse = (double)mw + log(sw);
    }
    log_rho[i] = lse - (double)lz;
    if (i < window) return;
    double *p = profile + i;  /* p[-j] is offset i - j */
    if (!direct) {
        float scale = (float)(1.0 / mass);
        for (int64_t j = 1; j <= i; j++) p[-j] += (double)(e[j] * scale);
    } else {
        float shift = (float)lse;
        for (int64_t j = 1; j <= i; j++) p[-j] += (double)fast_expf(s[j] - shift);
    }
}

/* "arch=" in target_clones needs GCC 11 or Clang 14; older compilers build one version */
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define RL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RL_CLONES
#endif

RL_CLONES int rl_accumulate(
    const float *scores, int64_t B, int64_t H, int64_t n,
    int64_t h0, int64_t h1,
    int64_t qlo, int64_t qhi, int64_t jlo, int64_t want,
    const int64_t *fold,
    double *diag, double *col, double *sumsq, double *sink, /* [B,H,2,n] [B,H,2,n] [B,H,2] [B,H] */
    double *row, float *log_z,                              /* [B,H,2,n] [B,H,n] */
    double *cell_p, double *cell_s,                         /* [2, L, H, C] or NULL */
    int64_t layer, int64_t L, int64_t C, const int64_t *row_start,
    int64_t *bad,
    int64_t window, int64_t sc_lo, int64_t sc_hi,            /* start cut: window 0 = off */
    double *log_rho, double *profile,                        /* [B,H,n] [B,H,n] */
    double *sc_diag, double *sc_col, double *sc_sq)          /* [B,H,n] [B,H,n] [B,H] */
{
    float e[n];
    double y[2][n];
    double *cells[2] = {cell_p, cell_s};
    for (int64_t h = h0; h < h1; h++) {
        for (int64_t i = 0; i < n; i++) {
            int scored = i >= qlo && i < qhi && jlo <= i;
            for (int64_t b = 0; b < B; b++) {
                int64_t bh = b * H + h;
                const float *s = scores + (bh * n + i) * n;
                int64_t end = last_finite(s, i, n) + 1;  /* keys >= end are masked (-inf): exp = 0 */
                /* A NaN score is skipped by the max but makes its fast_expf, so S and
                 * log Z, NaN: the finite test below catches it without a pass of its own. */
                float m = -INFINITY;
#pragma omp simd reduction(max:m)
                for (int64_t j = 0; j < end; j++) m = s[j] > m ? s[j] : m;
                for (int64_t j = 0; j < end; j++) e[j] = fast_expf(s[j] - m);
                for (int64_t j = end; j < n; j++) e[j] = 0.0f;
                double S = 0.0;
                for (int64_t j = 0; j < end; j++) S += (double)e[j];
                float lz = (float)((double)m + log(S));
                if (!finite_float(m) || !finite_float(lz)) {
                    bad[0] = b; bad[1] = h; bad[2] = i;
                    return 1;
                }
                log_z[bh * n + i] = lz;
                float inv = (float)(1.0 / S);
                if (i >= 1) sink[bh] += (double)(e[0] * inv) / (double)(n - 1);
                if (window > 0) start_cut_row(s, e, m, lz, i, window, log_rho + bh * n,
                                              profile + bh * n);
                if (!scored) continue;
                double *dg = diag + bh * 2 * n, *cl = col + bh * 2 * n, *rw = row + bh * 2 * n;
                double *sq = sumsq + bh * 2;
                int64_t base = ((fold[b] * L + layer) * H + h) * C + row_start[i] - jlo;
                /* per target: y once as doubles, then one pass for the row, column and
                 * cell sums and one for the diagonal sums (a reversed index) */
                for (int t = 0; t < 2; t++) {
                    if (!(want & (1 << t))) continue;
                    double *yt = y[t];
                    if (t == 0)
                        for (int64_t j = jlo; j <= i; j++) yt[j] = (double)(e[j] * inv);
                    else
                        for (int64_t j = jlo; j <= i; j++) yt[j] = (double)s[j];
                    double *dt = dg + t * n + i, *ct = cl + t * n, *qt = sq + t;
                    if (t == 1 && i >= sc_lo && i < sc_hi) {
                        dt = sc_diag + bh * n + i;
                        ct = sc_col + bh * n;
                        qt = sc_sq + bh;
                    }
                    double *c = cells[t] ? cells[t] + base : ct;  /* no cells: a harmless dummy */
                    double r = 0.0, q = 0.0;
                    if (cells[t]) {
#pragma GCC ivdep
                        for (int64_t j = jlo; j <= i; j++) {
                            r += yt[j];
                            q += yt[j] * yt[j];
                            ct[j] += yt[j];
                            c[j] += yt[j];
                        }
                    } else {
                        for (int64_t j = jlo; j <= i; j++) {
                            r += yt[j];
                            q += yt[j] * yt[j];
                            ct[j] += yt[j];
                        }
                    }
                    for (int64_t j = jlo; j <= i; j++) dt[-j] += yt[j];
                    rw[t * n + i] += r;
                    *qt += q;
                }
            }
        }
    }
    return 0;
}

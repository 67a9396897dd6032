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
 * profile[i - j] += exp(s_ij - LSE_window_i) over rows i >= w and keys j >= 1, and
 * log A = s - log Z_i's diagonal, column, row and squared sums over the start cut's rows
 * sc_lo <= i < sc_hi (all scored, keys jlo..i) in sc_diag / sc_col / sc_row / sc_sq.
 * Sums by offset are kept in reversed order while rows are added (every inner loop then
 * runs forward) and put in offset order once a prompt-head is done.
 * Keys after the last finite score (the causal mask's -inf) get exp = 0 without
 * being computed. Every per-prompt value enters a double before it is summed with
 * anything. exp is a vectorisable polynomial (fast_expf, about 1 ulp), so values
 * differ from torch's by float32 rounding only. Built with -fassociative-math (sums
 * vectorise), so never rely on float tricks such as the 1.5 * 2^23 rounding constant
 * here.
 *
 * Compiled at first use by rope_leak.engine.kernel (the system C compiler, no torch
 * headers) and called through ctypes. Built with OpenMP where the compiler has it: the
 * work units (heads, or head-prompt pairs) run in an OpenMP team, which in a torch
 * process built on OpenMP is torch's own thread pool (one libgomp is loaded), so its
 * threads, still spinning after the attention's last operation, take the work at once
 * instead of competing with it for the cores.
 *
 * On x86-64 Linux with GCC or Clang the row loop (head_rows, where the OpenMP team's
 * work is done) is also built for x86-64-v3 (AVX2, FMA) and the loader picks that clone
 * on CPUs that have it (target_clones): about twice as fast, and the library stays
 * portable to any x86-64 CPU.
 */
#include <math.h>
#include <stdlib.h>
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
                                 int64_t n, int64_t window, double *log_rho, double *profile)
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
    double *restrict p = profile + (n - 1 - i);  /* reversed: p[j] is offset i - j */
    if (!direct) {
        float scale = (float)(1.0 / mass);
        for (int64_t j = 1; j <= i; j++) p[j] += (double)(e[j] * scale);
    } else {
        float shift = (float)lse;
        for (int64_t j = 1; j <= i; j++) p[j] += (double)fast_expf(s[j] - shift);
    }
}

/* "arch=" in target_clones needs GCC 11 or Clang 14; older compilers build one version */
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define RL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RL_CLONES
#endif

/* Everything one call reads and writes (see rl_accumulate). */
typedef struct {
    const float *scores;
    int64_t B, H, n, qlo, qhi, jlo, want;
    const int64_t *fold;
    double *diag, *col, *sumsq, *sink, *row;
    float *log_z;
    double *cells[2];
    int64_t layer, L, C;
    const int64_t *row_start;
    int64_t window, sc_lo, sc_hi;
    double *log_rho, *profile, *sc_diag, *sc_col, *sc_sq, *sc_row;
} Call;

/* Both dense targets of one scored row in one pass, the common case (no cell sums):
 * y = pattern e[j] * inv and scores s[j] as doubles, their row sums and squares (out[0..3])
 * and their column and (reversed) diagonal sums. */
static inline void both_targets_row(const float *restrict e, float inv, const float *restrict s,
                                    int64_t lo, int64_t hi,
                                    double *restrict col_p, double *restrict diag_p,
                                    double *restrict col_s, double *restrict diag_s, double *out)
{
    double rp = 0.0, qp = 0.0, rs = 0.0, qs = 0.0;
    for (int64_t j = lo; j <= hi; j++) {
        double p = (double)(e[j] * inv), v = (double)s[j];
        rp += p;
        qp += p * p;
        rs += v;
        qs += v * v;
        col_p[j] += p;
        diag_p[j] += p;
        col_s[j] += v;
        diag_s[j] += v;
    }
    out[0] = rp; out[1] = qp; out[2] = rs; out[3] = qs;
}

static void reverse(double *x, int64_t n)
{
    for (int64_t k = 0; k < n / 2; k++) {
        double t = x[k];
        x[k] = x[n - 1 - k];
        x[n - 1 - k] = t;
    }
}

/* After all rows of prompt-head bh: the diagonal-like sums, kept reversed while rows were
 * added (so that every inner loop runs forward), are put in offset order; the start
 * cut's score sums are added back to the full pairs' and turned into log A = s - log Z's
 * sums (a part -log Z_i constant along row i: O(1) per row with difference arrays; the
 * torch path's formula, rope_leak.engine.start_cut.log_pattern_sums). */
static void finish_prompt_head(const Call *a, int64_t bh, double *scratch)
{
    const int64_t n = a->n, jlo = a->jlo;
    for (int t = 0; t < 2; t++)
        if (a->want & (1 << t)) reverse(a->diag + (bh * 2 + t) * n, n);
    if (a->window <= 0) return;
    reverse(a->profile + bh * n, n);
    double *sd = a->sc_diag + bh * n, *sc = a->sc_col + bh * n, *sr = a->sc_row + bh * n;
    reverse(sd, n);
    double *dg = a->diag + (bh * 2 + 1) * n, *cl = a->col + (bh * 2 + 1) * n;
    const double *rw = a->row + (bh * 2 + 1) * n;
    const float *lz = a->log_z + bh * n;
    for (int64_t k = 0; k < n; k++) {
        dg[k] += sd[k];
        cl[k] += sc[k];
    }
    a->sumsq[bh * 2 + 1] += a->sc_sq[bh];
    double *by_offset = scratch, *by_key = scratch + n + 1;
    memset(scratch, 0, 2 * (n + 1) * sizeof *scratch);
    double sq = 0.0;
    for (int64_t i = a->sc_lo; i < a->sc_hi; i++) {  /* keys jlo..i, all scored */
        double r = -(double)lz[i], count = (double)(i - jlo + 1);
        by_offset[0] += r;
        by_offset[i - jlo + 1] -= r;
        by_key[jlo] += r;
        by_key[i + 1] -= r;
        sq += 2.0 * r * rw[i] + count * r * r;
        sr[i] = rw[i] + count * r;
    }
    a->sc_sq[bh] += sq;
    double run_offset = 0.0, run_key = 0.0;
    for (int64_t k = 0; k < n; k++) {
        run_offset += by_offset[k];
        run_key += by_key[k];
        sd[k] += run_offset;
        sc[k] += run_key;
    }
}

/* Rows i = 0..n-1 of head h for prompts b0 <= b < b1 (prompt innermost, so a row of cell
 * sums stays in cache across the batch). e and y: scratch of n floats and 3 n doubles.
 * Returns 0, or 1 with bad = (b, h, i) of the first row whose scores are not finite. */
RL_CLONES static int head_rows(const Call *a, int64_t h, int64_t b0, int64_t b1, float *e, double *y0,
                               int64_t *bad)
{
    const int64_t H = a->H, n = a->n, jlo = a->jlo;
    double *y[2] = {y0, y0 + n}, *discard = y0 + 2 * n;
    const int fused = a->want == 3 && a->cells[0] == NULL && a->cells[1] == NULL;
    for (int64_t i = 0; i < n; i++) {
        int scored = i >= a->qlo && i < a->qhi && jlo <= i;
        int in_cut = i >= a->sc_lo && i < a->sc_hi;
        for (int64_t b = b0; b < b1; b++) {
            int64_t bh = b * H + h;
            const float *s = a->scores + (bh * n + i) * n;
            int64_t end = last_finite(s, i, n) + 1;  /* keys >= end are masked (-inf): exp = 0 */
            /* A NaN score is skipped by the max but makes its fast_expf, so S and
             * log Z, NaN: the finite test below catches it without a pass of its own. */
            float m = -INFINITY;
#pragma omp simd reduction(max:m)
            for (int64_t j = 0; j < end; j++) m = s[j] > m ? s[j] : m;
            double S = 0.0;
            for (int64_t j = 0; j < end; j++) {
                e[j] = fast_expf(s[j] - m);
                S += (double)e[j];
            }
            for (int64_t j = end; j <= i; j++) e[j] = 0.0f;  /* masked keys read below */
            float lz = (float)((double)m + log(S));
            if (!finite_float(m) || !finite_float(lz)) {
                bad[0] = b; bad[1] = h; bad[2] = i;
                return 1;
            }
            a->log_z[bh * n + i] = lz;
            float inv = (float)(1.0 / S);
            if (i >= 1) a->sink[bh] += (double)(e[0] * inv) / (double)(n - 1);
            if (a->window > 0) start_cut_row(s, e, m, lz, i, n, a->window, a->log_rho + bh * n,
                                             a->profile + bh * n);
            if (!scored) continue;
            /* target t's sums: diagonal (reversed: [j] is offset i - j), column, row, square;
             * the start cut's rows keep their score sums apart */
            double *dg[2], *cl[2], *qt[2];
            double *rw = a->row + bh * 2 * n;
            for (int t = 0; t < 2; t++) {
                dg[t] = a->diag + (bh * 2 + t) * n + (n - 1 - i);
                cl[t] = a->col + (bh * 2 + t) * n;
                qt[t] = a->sumsq + bh * 2 + t;
            }
            if (in_cut) {
                dg[1] = a->sc_diag + bh * n + (n - 1 - i);
                cl[1] = a->sc_col + bh * n;
                qt[1] = a->sc_sq + bh;
            }
            if (fused) {
                double sums[4];
                both_targets_row(e, inv, s, jlo, i, cl[0], dg[0], cl[1], dg[1], sums);
                rw[i] += sums[0];
                *qt[0] += sums[1];
                rw[n + i] += sums[2];
                *qt[1] += sums[3];
                continue;
            }
            int64_t base = ((a->fold[b] * a->L + a->layer) * H + h) * a->C + a->row_start[i] - jlo;
            /* per target: y once as doubles, then one pass for the row, column, diagonal
             * and cell sums */
            for (int t = 0; t < 2; t++) {
                if (!(a->want & (1 << t))) continue;
                double *yt = y[t];
                if (t == 0)
                    for (int64_t j = jlo; j <= i; j++) yt[j] = (double)(e[j] * inv);
                else
                    for (int64_t j = jlo; j <= i; j++) yt[j] = (double)s[j];
                double *ct = cl[t], *dt = dg[t];
                double *cells = a->cells[t];
                double *c = cells ? cells + base : discard;  /* no cells: summed, never read */
                double r = 0.0, q = 0.0;
#pragma GCC ivdep
                for (int64_t j = jlo; j <= i; j++) {
                    r += yt[j];
                    q += yt[j] * yt[j];
                    ct[j] += yt[j];
                    dt[j] += yt[j];
                    c[j] += yt[j];
                }
                rw[t * n + i] += r;
                *qt[t] += q;
            }
        }
    }
    for (int64_t b = b0; b < b1; b++) finish_prompt_head(a, b * H + h, y0);
    return 0;
}

/* Returns 0; 1 when a row's scores are not finite (bad = its b, h, i: of the first such
 * work unit); 2 when scratch memory could not be allocated. */
int rl_accumulate(
    const float *scores, int64_t B, int64_t H, int64_t n,
    int64_t threads,
    int64_t qlo, int64_t qhi, int64_t jlo, int64_t want,
    const int64_t *fold,
    double *diag, double *col, double *sumsq, double *sink, /* [B,H,2,n] [B,H,2,n] [B,H,2] [B,H] */
    double *row, float *log_z,                              /* [B,H,2,n] [B,H,n] */
    double *cell_p, double *cell_s,                         /* [2, L, H, C] or NULL */
    int64_t layer, int64_t L, int64_t C, const int64_t *row_start,
    int64_t *bad,
    int64_t window, int64_t sc_lo, int64_t sc_hi,            /* start cut: window 0 = off */
    double *log_rho, double *profile,                        /* [B,H,n] [B,H,n] */
    double *sc_diag, double *sc_col, double *sc_sq,          /* [B,H,n] [B,H,n] [B,H] */
    double *sc_row)                                          /* [B,H,n] */
{
    const Call a = {scores, B, H, n, qlo, qhi, jlo, want, fold, diag, col, sumsq, sink, row, log_z,
                    {cell_p, cell_s}, layer, L, C, row_start, window, sc_lo, sc_hi,
                    log_rho, profile, sc_diag, sc_col, sc_sq, sc_row};
    /* Work units whose outputs are disjoint: (head, prompt) pairs, or whole heads when
     * the cell sums (indexed by fold, not prompt) are kept. Each unit's sums are made in
     * one fixed order, so the results do not depend on the thread count. */
    const int per_head = cell_p != NULL || cell_s != NULL;
    const int64_t units = H * (per_head ? 1 : B);
    int64_t failed = -1;  /* the first failed unit */
    int out_of_memory = 0;
    (void)threads;  /* without OpenMP: one thread */
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *e = malloc(n * sizeof *e);
        double *y = malloc(3 * n * sizeof *y);
        int64_t mine[3];
        if (e == NULL || y == NULL) {
#pragma omp atomic write
            out_of_memory = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            if (e == NULL || y == NULL) continue;
            int64_t h = per_head ? u : u / B, b0 = per_head ? 0 : u % B;
            int64_t b1 = per_head ? B : b0 + 1;
            if (head_rows(&a, h, b0, b1, e, y, mine)) {
#pragma omp critical(rl_bad)
                if (failed < 0 || u < failed) {
                    failed = u;
                    bad[0] = mine[0]; bad[1] = mine[1]; bad[2] = mine[2];
                }
            }
        }
        free(e);
        free(y);
    }
    if (out_of_memory) return 2;
    return failed >= 0;
}

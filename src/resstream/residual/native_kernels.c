/* Fused CPU kernels of the depth mixing (float32), built and loaded by residual/native.py.
 *
 * Every tensor is a row-major [N, D] block of N tokens (or [N, ...] per-token statistics). On
 * a CPU the mixing is memory-bound: what it costs is how often each [N, D] tensor is read or
 * written. Each kernel here walks the tokens once, keeping the token's rows (D floats) in L1
 * while it combines them, so a mixture of n sources for S queries reads each source once and
 * writes each output once, where eager PyTorch makes one full pass per operator.
 * Tokens are split between threads (static schedule: results do not depend on timing).
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TOKENS_PARALLEL _Pragma("omp parallel for schedule(static) num_threads(nt) if(nt > 1)")

/* Tokens go in tiles of about 64 KiB per tensor: within a tile, one source at a time is read as
 * one contiguous run (a few streams for the hardware prefetcher, not one per source), while the
 * tile's outputs stay in L2. (16 KiB tiles, which kept the outputs in L1, made Full AttnRes's
 * mixing 3-5% slower at d_model 128 and 256 on a 2-core EPYC: the runs were too short for the
 * prefetcher; 4 KiB ones 5% slower still.) */
static long tile_tokens(long D)
{
    long t = 16384 / (D > 0 ? D : 1);
    return t < 1 ? 1 : t;
}

/* for each tile [t0, t1) of the N tokens, tiles split between threads (static schedule) */
#define FOR_TILES(N, D, t0, t1)                                                                  \
    const long TT_ = tile_tokens(D), tiles_ = ((N) + TT_ - 1) / TT_;                             \
    _Pragma("omp parallel for schedule(static) num_threads(nt) if(nt > 1)")                      \
    for (long k_ = 0; k_ < tiles_; k_++)                                                         \
        for (long t0 = k_ * TT_, t1 = t0 + TT_ < (N) ? t0 + TT_ : (N), once_ = 1; once_; once_ = 0)

/* The group of (up to) four items of n starting at j, as the loops below take them four at a time:
 * their indices in ix (a group of fewer than four repeats its last item, which the caller weights
 * 0); returns how many are real. */
static inline int group4(int j, int n, int ix[4])
{
    const int m = n - j < 4 ? n - j : 4;
    for (int i = 0; i < 4; i++) ix[i] = j + (i < m ? i : m - 1);
    return m;
}

/* One output over tokens [t0, t1): o = acc + sum_j w[j][t * ws[j]] v[j][t] (acc may be NULL or o).
 * Sources go four at a time (o += c0 v0 + c1 v1 + c2 v2 + c3 v3: one pass over the output row
 * per four source rows). The one mixing loop of every kernel here, so that a mixture recomputed
 * by another kernel is bitwise the same. */
static inline void mix_tile(long D, int n, const float **v, const float **w, const long *ws, const float *a,
                            float *out, long t0, long t1)
{
    for (int j = 0; j < n; j += 4) {
        int ix[4];
        const int m = group4(j, n, ix);
        const float *v0 = v[ix[0]], *v1 = v[ix[1]], *v2 = v[ix[2]], *v3 = v[ix[3]];
        for (long t = t0; t < t1; t++) {
            float *restrict o = out + t * D;
            const float *restrict r0 = v0 + t * D, *restrict r1 = v1 + t * D, *restrict r2 = v2 + t * D,
                        *restrict r3 = v3 + t * D;
            const float c0 = w[j][t * ws[j]], c1 = m > 1 ? w[j + 1][t * ws[j + 1]] : 0.0f,
                        c2 = m > 2 ? w[j + 2][t * ws[j + 2]] : 0.0f, c3 = m > 3 ? w[j + 3][t * ws[j + 3]] : 0.0f;
            if (j > 0 || (a && a == out)) {
                _Pragma("omp simd")
                for (long d = 0; d < D; d++) o[d] += ((c0 * r0[d] + c1 * r1[d]) + (c2 * r2[d] + c3 * r3[d]));
            } else if (a) {
                const float *restrict at = a + t * D;
                _Pragma("omp simd")
                for (long d = 0; d < D; d++) o[d] = at[d] + ((c0 * r0[d] + c1 * r1[d]) + (c2 * r2[d] + c3 * r3[d]));
            } else {
                _Pragma("omp simd")
                for (long d = 0; d < D; d++) o[d] = ((c0 * r0[d] + c1 * r1[d]) + (c2 * r2[d] + c3 * r3[d]));
            }
        }
    }
}

/* out[s][t] = acc[s][t] (when acc and acc[s] are given) + sum_j w[s*n + j][t * ws[s*n + j]] v[j][t],
 * s < S: each weight is a column of some per-token tensor, given by its pointer and token stride.
 * out[s] may be acc[s] (in place). */
void rs_mix(long N, long D, int n, int S, const float **v, const float **w, const long *ws, const float **acc,
            float **out, int nt)
{
    FOR_TILES(N, D, t0, t1) {
        for (int s = 0; s < S; s++)
            mix_tile(D, n, v, w + (long)s * n, ws + (long)s * n, (acc && acc[s]) ? acc[s] : NULL, out[s], t0, t1);
    }
}

/* exp(x), to about 1 ulp, for x <= 0 (a softmax's z - max; below -87 it gives about 1e-38
 * instead of a denormal or 0), written so that the compiler vectorises a loop over it: x = n ln2 +
 * f with |f| <= ln2 / 2, exp(f) by its Taylor series to degree 7, 2^n from the exponent bits. */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;
    const float shift = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    const float k = (x * 1.44269504f + shift) - shift;
    const float f = (x - k * 0.693145752f) - k * 1.42860677e-6f;  /* ln 2 in two parts */
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    union { int i; float f; } two_k = { .i = ((int)k + 127) << 23 };
    return p * two_k.f;
}

#define SOFTMAX_CHUNK 256

/* A read of Full AttnRes in one pass: alpha[j] = softmax_j z[j] per token (z: n contiguous
 * per-token logit columns; alpha written as n contiguous columns, [n, N]),
 * x = sum_j alpha[j][t] v[j][t] (the mixing loop of rs_mix). */
void rs_softmax_mix(long N, long D, int n, const float **v, const float **z, float *alpha, float *x, int nt)
{
    const float *cols[n];  /* where the mixing loop reads alpha back */
    long ones[n];
    for (int j = 0; j < n; j++) {
        cols[j] = alpha + j * N;
        ones[j] = 1;
    }
    FOR_TILES(N, D, t0, t1) {
        for (long c0 = t0; c0 < t1; c0 += SOFTMAX_CHUNK) {
            const long m = t1 - c0 < SOFTMAX_CHUNK ? t1 - c0 : SOFTMAX_CHUNK;
            float mx[SOFTMAX_CHUNK], sum[SOFTMAX_CHUNK];
            for (long t = 0; t < m; t++) {
                mx[t] = z[0][c0 + t];
                sum[t] = 0.0f;
            }
            for (int j = 1; j < n; j++) {
                const float *zj = z[j] + c0;
                _Pragma("omp simd")
                for (long t = 0; t < m; t++) mx[t] = zj[t] > mx[t] ? zj[t] : mx[t];
            }
            for (int j = 0; j < n; j++) {
                const float *zj = z[j] + c0;
                float *aj = alpha + j * N + c0;
                _Pragma("omp simd")
                for (long t = 0; t < m; t++) {
                    aj[t] = exp_nonpositive(zj[t] - mx[t]);
                    sum[t] += aj[t];
                }
            }
            for (long t = 0; t < m; t++) sum[t] = 1.0f / sum[t];
            for (int j = 0; j < n; j++) {
                float *aj = alpha + j * N + c0;
                _Pragma("omp simd")
                for (long t = 0; t < m; t++) aj[t] *= sum[t];
            }
        }
        mix_tile(D, n, v, cols, ones, NULL, x, t0, t1);
    }
}

/* Logits of one source v [N, D] against R query rows q [R, D] (row-major), the source RMS-normed
 * per token: z[k * zrs + t] = (q[k] . v[t]) / RMS(v[t]), RMS = sqrt(mean(v^2) + eps). The lean
 * decoding path's write of a source (attnres/lean.py): its logits for every later row at once. */
void rs_normed_logits(long N, long D, int R, const float *v, const float *q, float eps, float *z, long zrs, int nt)
{
    TOKENS_PARALLEL
    for (long t = 0; t < N; t++) {
        const float *restrict vt = v + t * D;
        float ss = 0.0f;
        _Pragma("omp simd reduction(+:ss)")
        for (long d = 0; d < D; d++) ss += vt[d] * vt[d];
        const float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (int k = 0; k < R; k++) {
            const float *restrict qk = q + (long)k * D;
            float acc = 0.0f;
            _Pragma("omp simd reduction(+:acc)")
            for (long d = 0; d < D; d++) acc += qk[d] * vt[d];
            z[k * zrs + t] = acc * r;
        }
    }
}

/* Block AttnRes phase 1, backward, for one block's S queries over n completed blocks b_j (see
 * attnres/phases.py), one pass: gA[t, s, j] = <g[s][t], b[j][t]> and
 * gb[j][t] = acc[j][t] (if given) + sum_s A[t, s, j] g[s][t]; A, gA contiguous [N, S, n]; gb[j]
 * may be acc[j] (in place). */
void rs_phase1_backward(long N, long D, int n, int S, const float **b, const float **g, const float *A,
                        float *gA, const float **acc, float **gb, int nt)
{
    FOR_TILES(N, D, t0, t1) {
        for (int j = 0; j < n; j++) {
            for (int s = 0; s < S; s++) {
                for (long t = t0; t < t1; t++) {
                    const float *bj = b[j] + t * D, *gs = g[s] + t * D;
                    float *o = gb[j] + t * D;
                    const float c = A[(t * S + s) * n + j];
                    if (s == 0) {  /* the block's gradient starts from its running sum */
                        const float *at = (acc && acc[j]) ? acc[j] + t * D : NULL;
                        if (at != o) {
                            for (long d = 0; d < D; d++) o[d] = at ? at[d] : 0.0f;
                        }
                    }
                    float dot = 0.0f;
                    _Pragma("omp simd reduction(+:dot)")
                    for (long d = 0; d < D; d++) {  /* one read of g's row for both */
                        dot += gs[d] * bj[d];
                        o[d] += c * gs[d];
                    }
                    gA[(t * S + s) * n + j] = dot;
                }
            }
        }
    }
}

/* out[t, s, j] = <g[s][t], v[j][t]> for s < S, j < n. out: contiguous [N, S, n]. */
void rs_dots(long N, long D, int n, int S, const float **v, const float **g, float *out, int nt)
{
    FOR_TILES(N, D, t0, t1) {
        for (int j = 0; j < n; j++) {
            for (int s = 0; s < S; s++) {
                for (long t = t0; t < t1; t++) {
                    const float *gs = g[s] + t * D, *vj = v[j] + t * D;
                    float acc = 0.0f;
                    _Pragma("omp simd reduction(+:acc)")
                    for (long d = 0; d < D; d++) acc += gs[d] * vj[d];
                    out[(t * S + s) * n + j] = acc;
                }
            }
        }
    }
}

/* Block AttnRes phase-2 merge, forward (see attnres/phases.py):
 * r = 1/RMS(p), s = r <q, p>, gate = sigmoid(s - lse), x = o + gate (p - o). */
void rs_merge_forward(long N, long D, const float *o, const float *p, const float *q, const float *lse,
                      float eps, float *x, float *r, float *s, float *gate, int nt)
{
    TOKENS_PARALLEL
    for (long t = 0; t < N; t++) {
        const float *pt = p + t * D, *ot = o + t * D;
        float ss = 0.0f, dq = 0.0f;
        _Pragma("omp simd reduction(+:ss, dq)")
        for (long d = 0; d < D; d++) {
            ss += pt[d] * pt[d];
            dq += pt[d] * q[d];
        }
        const float rt = 1.0f / sqrtf(ss / (float)D + eps);
        const float st = dq * rt;
        const float g = 1.0f / (1.0f + expf(-(st - lse[t])));
        float *xt = x + t * D;
        for (long d = 0; d < D; d++) xt[d] = ot[d] + g * (pt[d] - ot[d]);
        r[t] = rt;
        s[t] = st;
        gate[t] = g;
    }
}

/* Its backward: dz = gate <gx, p - x>, go = gx (1 - gate),
 * gp = gate gx + dz r q - dz r^2 s / D p, and dq = sum_t dz r p: thread k of nt adds its tokens'
 * share into gq_parts[k * D ..] (zeroed by the caller, summed by it in a fixed order, so that
 * results do not depend on timing). */
void rs_merge_backward(long N, long D, const float *restrict gx, const float *restrict p, const float *restrict x,
                       const float *restrict q, const float *restrict r, const float *restrict s,
                       const float *restrict gate, float *restrict go, float *restrict gp, float *restrict dz,
                       float *restrict gq_parts, int nt)
{
    _Pragma("omp parallel num_threads(nt) if(nt > 1)")
    {
        int k = 0, nk = 1;
#ifdef _OPENMP
        k = omp_get_thread_num();
        nk = omp_get_num_threads();
#endif
        float *restrict gq = gq_parts + (long)k * D;
        long chunk = (N + nk - 1) / nk, t0 = k * chunk, t1 = t0 + chunk < N ? t0 + chunk : N;
        for (long t = t0; t < t1; t++) {
            const float *restrict gt = gx + t * D, *restrict pt = p + t * D, *restrict xt = x + t * D;
            float acc = 0.0f;
            _Pragma("omp simd reduction(+:acc)")
            for (long d = 0; d < D; d++) acc += gt[d] * (pt[d] - xt[d]);
            const float g = gate[t], z = g * acc;
            const float cq = z * r[t], cp = z * r[t] * r[t] * s[t] / (float)D;
            float *restrict got = go + t * D, *restrict gpt = gp + t * D;
            _Pragma("omp simd")
            for (long d = 0; d < D; d++) {
                gpt[d] = gt[d] * g + cq * q[d] - cp * pt[d];
                got[d] = gt[d] - gt[d] * g;
                gq[d] += cq * pt[d];
            }
            dz[t] = z;
        }
    }
}

/* Full AttnRes / depth_swa: the whole gradient of one source v (see attnres/source_grad.py), once
 * every reader of it has run its backward. Reader m (a mixture x_m = sum_i alpha_m,i v_i read by
 * query row q_m, with output gradient g_m) gave a[m] (its weight column for v), g[m] and
 * gx[m][t] = <g_m, x_m>; z[m] is v's logit column for that row and r[t] = 1/RMS(v) (every
 * column contiguous over the tokens). Per token:
 *   dz_m = a_m (<g_m, v> - gx_m)                       (softmax backward, the logit's gradient)
 *   gv   = direct + sum_m a_m g_m                      (the value path)
 *        + r sum_m dz_m q_m - (r^2 / D)(sum_m dz_m z_m) v   (the normalised-key path)
 * Readers go four at a time (one pass over gv's row per four gradient rows). Writes gv [N, D]
 * and dz as M contiguous columns [M, N] (the caller forms the queries' gradient from dz, r, v). */
void rs_source_backward(long N, long D, int M, const float *v, const float *r, const float **z, const float **g,
                        const float **a, const float **gx, const float **q, const float *direct, float *gv,
                        float *dz, int nt)
{
    FOR_TILES(N, D, t0, t1) {
        for (int m = 0; m < M; m += 4) {
            int ix[4];
            const int k = group4(m, M, ix), i1 = ix[1], i2 = ix[2], i3 = ix[3];
            for (long t = t0; t < t1; t++) {
                const float *restrict g0 = g[m] + t * D, *restrict g1 = g[i1] + t * D, *restrict g2 = g[i2] + t * D,
                            *restrict g3 = g[i3] + t * D, *restrict vt = v + t * D;
                float *o = gv + t * D;  /* may be base (m > 0): omp simd, not restrict, says it is safe */
                const float a0 = a[m][t], a1 = k > 1 ? a[i1][t] : 0.0f, a2 = k > 2 ? a[i2][t] : 0.0f,
                            a3 = k > 3 ? a[i3][t] : 0.0f;
                float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
                const float *base = m > 0 ? o : direct ? direct + t * D : NULL;
                if (base) {
                    _Pragma("omp simd reduction(+:d0, d1, d2, d3)")
                    for (long d = 0; d < D; d++) {  /* one read of each g row for both */
                        d0 += g0[d] * vt[d];
                        d1 += g1[d] * vt[d];
                        d2 += g2[d] * vt[d];
                        d3 += g3[d] * vt[d];
                        o[d] = base[d] + ((a0 * g0[d] + a1 * g1[d]) + (a2 * g2[d] + a3 * g3[d]));
                    }
                } else {
                    _Pragma("omp simd reduction(+:d0, d1, d2, d3)")
                    for (long d = 0; d < D; d++) {
                        d0 += g0[d] * vt[d];
                        d1 += g1[d] * vt[d];
                        d2 += g2[d] * vt[d];
                        d3 += g3[d] * vt[d];
                        o[d] = (a0 * g0[d] + a1 * g1[d]) + (a2 * g2[d] + a3 * g3[d]);
                    }
                }
                const float dots[4] = {d0, d1, d2, d3}, as[4] = {a0, a1, a2, a3};
                for (int i = 0; i < k; i++) dz[(m + i) * N + t] = as[i] * (dots[i] - gx[m + i][t]);
            }
        }
        for (long t = t0; t < t1; t++) {  /* the key path: r sum_m dz_m q_m - (r^2/D)(sum_m dz_m z_m) v */
            const float *restrict vt = v + t * D;
            float *restrict o = gv + t * D;
            float sdc = 0.0f;
            for (int m = 0; m < M; m++) sdc += dz[m * N + t] * z[m][t];
            const float rt = r[t], coef = rt * rt * sdc / (float)D;
            for (int m = 0; m < M; m += 4) {
                int ix[4];
                const int k = group4(m, M, ix);
                const float *restrict q0 = q[ix[0]], *restrict q1 = q[ix[1]], *restrict q2 = q[ix[2]],
                            *restrict q3 = q[ix[3]];
                const float w0 = rt * dz[m * N + t], w1 = k > 1 ? rt * dz[(m + 1) * N + t] : 0.0f,
                            w2 = k > 2 ? rt * dz[(m + 2) * N + t] : 0.0f, w3 = k > 3 ? rt * dz[(m + 3) * N + t] : 0.0f;
                const float cv = m == 0 ? coef : 0.0f;
                _Pragma("omp simd")
                for (long d = 0; d < D; d++) o[d] += ((w0 * q0[d] + w1 * q1[d]) + (w2 * q2[d] + w3 * q3[d])) - cv * vt[d];
            }
        }
    }
}

/* Hyper-connection streams (hyper/streams.py), per token: H [n, D] rows, coefficient blocks given
 * by pointer and token stride (a static coefficient has stride 0), row-major within a token.
 * Read:  x = sum_j c0_j h_j.     Write: h'_i = sum_j res_ij h_j + post_i y. */
void rs_streams_read(long N, long D, int n, const float *c0, long c0s, const float *H, float *x, int nt)
{
    TOKENS_PARALLEL
    for (long t = 0; t < N; t++) {
        const float *c = c0 + t * c0s, *h = H + t * n * D;
        float *restrict o = x + t * D;
        for (long d = 0; d < D; d++) o[d] = c[0] * h[d];
        for (int j = 1; j < n; j++) {
            const float cj = c[j], *restrict hj = h + j * D;
            _Pragma("omp simd")
            for (long d = 0; d < D; d++) o[d] += cj * hj[d];
        }
    }
}

void rs_streams_write(long N, long D, int n, const float *res, long ress, const float *post, long posts,
                      const float *H, const float *y, float *Hout, int nt)
{
    TOKENS_PARALLEL
    for (long t = 0; t < N; t++) {
        const float *R = res + t * ress, *p = post + t * posts, *h = H + t * n * D, *restrict yt = y + t * D;
        for (int i = 0; i < n; i++) {
            float *restrict o = Hout + (t * n + i) * D;
            const float pi = p[i];
            _Pragma("omp simd")
            for (long d = 0; d < D; d++) o[d] = pi * yt[d];
            for (int j = 0; j < n; j++) {
                const float rij = R[i * n + j], *restrict hj = h + j * D;
                _Pragma("omp simd")
                for (long d = 0; d < D; d++) o[d] += rij * hj[d];
            }
        }
    }
}

/* Write's backward: gres_ij = <g_i, h_j>, gpost_i = <g_i, y>, gH_j = sum_i res_ij g_i,
 * gy = sum_i post_i g_i (g = dL/dH', gres [N, n, n], gpost [N, n] contiguous). */
void rs_streams_write_backward(long N, long D, int n, const float *res, long ress, const float *post, long posts,
                               const float *H, const float *y, const float *G, float *gres, float *gpost,
                               float *gH, float *gy, int nt)
{
    TOKENS_PARALLEL
    for (long t = 0; t < N; t++) {
        const float *R = res + t * ress, *p = post + t * posts, *h = H + t * n * D, *g = G + t * n * D;
        const float *restrict yt = y + t * D;
        float *restrict gyt = gy + t * D;
        for (long d = 0; d < D; d++) gyt[d] = 0.0f;
        for (int j = 0; j < n; j++) {
            float *restrict o = gH + (t * n + j) * D;
            for (long d = 0; d < D; d++) o[d] = 0.0f;
        }
        for (int i = 0; i < n; i++) {
            const float *restrict gi = g + i * D;
            float dp = 0.0f;
            _Pragma("omp simd reduction(+:dp)")
            for (long d = 0; d < D; d++) dp += gi[d] * yt[d];
            gpost[t * n + i] = dp;
            const float pi = p[i];
            _Pragma("omp simd")
            for (long d = 0; d < D; d++) gyt[d] += pi * gi[d];
            for (int j = 0; j < n; j++) {
                const float *restrict hj = h + j * D;
                float *restrict o = gH + (t * n + j) * D;
                const float rij = R[i * n + j];
                float dr = 0.0f;
                _Pragma("omp simd reduction(+:dr)")
                for (long d = 0; d < D; d++) {
                    dr += gi[d] * hj[d];
                    o[d] += rij * gi[d];
                }
                gres[(t * n + i) * n + j] = dr;
            }
        }
    }
}

/* Read's backward: gc0_j = <gx, h_j>; gH_j = acc_j (if acc) + c0_j gx (gH may be acc: in place). */
void rs_streams_read_backward(long N, long D, int n, const float *c0, long c0s, const float *H, const float *gx,
                              const float *acc, float *gc0, float *gH, int nt)
{
    TOKENS_PARALLEL
    for (long t = 0; t < N; t++) {
        const float *c = c0 + t * c0s, *h = H + t * n * D;
        const float *restrict g = gx + t * D;
        for (int j = 0; j < n; j++) {
            const float *restrict hj = h + j * D;
            const float *a = acc ? acc + (t * n + j) * D : NULL;
            float *o = gH + (t * n + j) * D;
            const float cj = c[j];
            float dc = 0.0f;
            _Pragma("omp simd reduction(+:dc)")
            for (long d = 0; d < D; d++) dc += g[d] * hj[d];
            gc0[t * n + j] = dc;
            if (a) {
                for (long d = 0; d < D; d++) o[d] = a[d] + cj * g[d];
            } else {
                for (long d = 0; d < D; d++) o[d] = cj * g[d];
            }
        }
    }
}

/* mHC's Sinkhorn-Knopp (hyper/sinkhorn.py) per token on z [N, n, n] (row i, column j): m = exp(z -
 * column max), then iters times divide by the column sums, then by the row sums. The backward
 * recomputes the forward's steps per token (scratch of 2 iters n^2 floats per thread) and walks
 * them back: for o = m / s with s = sum over the axis of m, dm = (g - sum_axis(g o)) / s. */
static void sk_exp(int n, const float *z, float *m)  /* m = exp(z - column max) */
{
    for (int j = 0; j < n; j++) {
        float mx = z[j];
        for (int i = 1; i < n; i++) mx = z[i * n + j] > mx ? z[i * n + j] : mx;
        for (int i = 0; i < n; i++) m[i * n + j] = expf(z[i * n + j] - mx);
    }
}

static void sk_step(int n, int cols, const float *m, float *o, float *s)  /* o = m / its column or row sums s */
{
    for (int a = 0; a < n; a++) {
        float acc = 0.0f;
        for (int b = 0; b < n; b++) acc += cols ? m[b * n + a] : m[a * n + b];
        s[a] = acc;
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) o[i * n + j] = m[i * n + j] / s[cols ? j : i];
}

static void sk_steps(int n, int iters, const float *z, float *m0, float *steps, float *sums)
{
    sk_exp(n, z, m0);
    const float *m = m0;
    for (int k = 0; k < 2 * iters; k++) {
        float *o = steps + (long)k * n * n;
        sk_step(n, k % 2 == 0, m, o, sums + (long)k * n);
        m = o;
    }
}

void rs_sinkhorn(long N, int n, int iters, const float *z, float *out, int nt)
{
    _Pragma("omp parallel num_threads(nt) if(nt > 1)")
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)n);
        _Pragma("omp for schedule(static)")
        for (long t = 0; t < N; t++) {
            float *m = out + t * n * n;  /* in place in the output */
            sk_exp(n, z + t * n * n, m);
            for (int k = 0; k < 2 * iters; k++) sk_step(n, k % 2 == 0, m, m, s);
        }
        free(s);
    }
}

void rs_sinkhorn_backward(long N, int n, int iters, const float *z, const float *g, float *gz, int nt)
{
    _Pragma("omp parallel num_threads(nt) if(nt > 1)")
    {
        const size_t nn = (size_t)n * n;
        float *m0 = (float *)malloc(sizeof(float) * (nn * (2 * (size_t)iters + 2) + 2 * (size_t)iters * n));
        float *steps = m0 + nn, *gg = steps + 2 * (size_t)iters * nn, *sums = gg + nn;
        _Pragma("omp for schedule(static)")
        for (long t = 0; t < N; t++) {
            sk_steps(n, iters, z + t * nn, m0, steps, sums);
            for (size_t i = 0; i < nn; i++) gg[i] = g[t * nn + i];
            for (int k = 2 * iters - 1; k >= 0; k--) {
                const float *o = steps + (long)k * nn, *s = sums + (long)k * n;
                const int cols = (k % 2 == 0);
                for (int a = 0; a < n; a++) {
                    float acc = 0.0f;  /* sum over the axis of g o */
                    for (int b = 0; b < n; b++) acc += cols ? gg[b * n + a] * o[b * n + a] : gg[a * n + b] * o[a * n + b];
                    for (int b = 0; b < n; b++) {
                        const long e = cols ? b * n + a : a * n + b;
                        gg[e] = (gg[e] - acc) / s[a];
                    }
                }
            }
            for (size_t i = 0; i < nn; i++) gz[t * nn + i] = gg[i] * m0[i];
        }
        free(m0);
    }
}

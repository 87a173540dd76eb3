/* Fused CPU kernels for the planned decode step (kernels/native.py builds and loads this file).
 *
 * torch cannot fuse a row gather into a matmul: the torch path copies every selected K/V row and
 * every scattered summary row once, then re-reads it for a GEMM with M = G (4) rows. These loops
 * read each row once, straight from the pool / the summaries, and compute what the core twins
 * compute (core.selection.score_blocks, core.attention.sparse_decode_attention), prefetching the
 * rows a few entries ahead, since the gathered rows are scattered over the pool.
 *
 * fp32 only, contiguous inputs, one thread; kernels/native.py checks shapes, dtypes and index
 * ranges before every call, so nothing here reads outside its arguments.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef AHEAD
#define AHEAD 8 /* rows prefetched ahead: about the line-fill buffers one core keeps busy */
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 3
#endif
#ifndef SCORE_AHEAD
#define SCORE_AHEAD 0 /* summaries: runs of consecutive rows, which the hardware prefetches; a
                         software prefetch made scoring slower (2.6 -> 3.1 ms at 32k) */
#endif

/* Into every cache level (locality 3): a non-temporal prefetch (0) made both kernels 2.5x
 * slower on this session's Xeon. */
static inline void prefetch_row(const float *row, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) /* 16 floats = one 64-byte line */
        __builtin_prefetch(row + i, 0, PREFETCH_LOCALITY);
}

enum { PLAIN, SQUARED, ABS_Q }; /* the products dot4 sums */

/* out[j] = sum_i of, for the query row g0 + j (j < 4) and x:
 *   PLAIN: q_i x_i;  SQUARED: (q_i x_i)^2, i.e. q^2 · x^2, the L2 radius term;  ABS_Q: |q_i| x_i.
 * Rows past G repeat the last one (computed, not used). q holds G rows of n; x is read once for
 * the four. */
static inline void dot4(const float *q, const float *x, int64_t n, int64_t g0, int64_t G,
                        int mode, float out[4]) {
    const float *q0 = q + g0 * n, *q1 = q + (g0 + 1 < G ? g0 + 1 : G - 1) * n;
    const float *q2 = q + (g0 + 2 < G ? g0 + 2 : G - 1) * n;
    const float *q3 = q + (g0 + 3 < G ? g0 + 3 : G - 1) * n;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < n; i++) {
        float a0 = q0[i], a1 = q1[i], a2 = q2[i], a3 = q3[i], xi = x[i];
        if (mode == ABS_Q) a0 = fabsf(a0), a1 = fabsf(a1), a2 = fabsf(a2), a3 = fabsf(a3);
        float p0 = a0 * xi, p1 = a1 * xi, p2 = a2 * xi, p3 = a3 * xi;
        if (mode == SQUARED) p0 *= p0, p1 *= p1, p2 *= p2, p3 *= p3;
        s0 += p0;
        s1 += p1;
        s2 += p2;
        s3 += p3;
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* score[b, h, j] = max over the G query heads g of the group of
 *   q·center[row, h] + sqrt(sum_d q_d^2 radius_d^2)   (l2[b] != 0)
 *   q·center[row, h] + sum_d |q_d| radius_d           (l2[b] == 0)
 * with row = index[b, j]; 0 where row < 0 (the caller's bias masks those).
 * q: [B, Hkv, G, D]; center, radius: [M, Hkv, D];
 * index: [B, NB]; l2: [B]; score: [B, Hkv, NB]. */
void ds_score(const float *q, const float *center,
              const float *radius, const int64_t *index, const uint8_t *l2, float *score,
              int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t NB) {
    for (int64_t b = 0; b < B; b++) {
        for (int64_t j = 0; j < NB; j++) {
            int64_t row = index[b * NB + j];
            if (SCORE_AHEAD && j + SCORE_AHEAD < NB && index[b * NB + j + SCORE_AHEAD] >= 0) {
                int64_t ahead = index[b * NB + j + SCORE_AHEAD];
                prefetch_row(center + ahead * Hkv * D, Hkv * D);
                prefetch_row(radius + ahead * Hkv * D, Hkv * D);
            }
            for (int64_t h = 0; h < Hkv; h++) {
                float *out = score + (b * Hkv + h) * NB + j;
                if (row < 0) {
                    *out = 0.f;
                    continue;
                }
                const float *c = center + (row * Hkv + h) * D;
                const float *r = radius + (row * Hkv + h) * D;
                const int64_t at = (b * Hkv + h) * G * D;
                float best = -INFINITY;
                for (int64_t g0 = 0; g0 < G; g0 += 4) { /* 4 query heads per pass over c, r */
                    float e[4], w[4];
                    dot4(q + at, c, D, g0, G, PLAIN, e);
                    if (l2[b]) {
                        dot4(q + at, r, D, g0, G, SQUARED, w);
                        for (int j = 0; j < 4; j++) w[j] = sqrtf(w[j]);
                    } else {
                        dot4(q + at, r, D, g0, G, ABS_Q, w);
                    }
                    for (int j = 0; j < 4 && g0 + j < G; j++)
                        best = e[j] + w[j] > best ? e[j] + w[j] : best;
                }
                *out = best;
            }
        }
    }
}

/* For each (request b, KV head h): softmax(scale * q_g · K[rows]) · V[rows] over the valid
 * entries of rows[b, h, :], for the G query heads g of the group.
 * q: [B, Hkv, G, D]; k: [R, D]; v: [R, Dv] (the pools as rows slot * Hkv + head);
 * rows, valid: [B, Hkv, N] (a negative row counts as padding); out: [B, Hkv, G, Dv];
 * lse: [B, Hkv, G] (natural log; -inf and a zero output where no entry is valid);
 * work: G * (N + 2) floats. */
#define USABLE(n) (ok[n] && rw[n] >= 0) /* an entry is attended: valid, and names a pool row */

void ds_attend(const float *q, const float *k, const float *v, const int64_t *rows,
               const uint8_t *valid, float *out, float *lse, float *work, float scale,
               int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t Dv, int64_t N) {
    for (int64_t bh = 0; bh < B * Hkv; bh++) {
        const int64_t *rw = rows + bh * N;
        const uint8_t *ok = valid + bh * N;
        const float *qg = q + bh * G * D;
        float *o = out + bh * G * Dv;
        float *mx = work + G * N, *sum = mx + G; /* per query head: running max, sum */
        for (int64_t g = 0; g < G; g++) mx[g] = -INFINITY;
        for (int64_t n = 0; n < N; n++) {
            if (n + AHEAD < N && USABLE(n + AHEAD)) prefetch_row(k + rw[n + AHEAD] * D, D);
            for (int64_t g0 = 0; g0 < G; g0 += 4) {
                float e[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
                if (USABLE(n)) dot4(qg, k + rw[n] * D, D, g0, G, PLAIN, e);
                for (int j = 0; j < 4 && g0 + j < G; j++) {
                    float x = USABLE(n) ? scale * e[j] : -INFINITY;
                    work[(g0 + j) * N + n] = x;
                    mx[g0 + j] = x > mx[g0 + j] ? x : mx[g0 + j];
                }
            }
        }
        memset(o, 0, sizeof(float) * G * Dv);
        for (int64_t g = 0; g < G; g++) {
            sum[g] = 0.f;
            if (mx[g] == -INFINITY) continue;
            for (int64_t n = 0; n < N; n++) {
                float p = USABLE(n) ? expf(work[g * N + n] - mx[g]) : 0.f;
                work[g * N + n] = p;
                sum[g] += p;
            }
        }
        for (int64_t n = 0; n < N; n++) {
            if (n + AHEAD < N && USABLE(n + AHEAD)) prefetch_row(v + rw[n + AHEAD] * Dv, Dv);
            if (!USABLE(n)) continue;
            const float *vr = v + rw[n] * Dv;
            int64_t g = 0;
            for (; g + 4 <= G; g += 4) { /* 4 query heads per pass over the V row */
                float p0 = work[g * N + n], p1 = work[(g + 1) * N + n];
                float p2 = work[(g + 2) * N + n], p3 = work[(g + 3) * N + n];
                float *o0 = o + g * Dv, *o1 = o0 + Dv, *o2 = o1 + Dv, *o3 = o2 + Dv;
#pragma omp simd
                for (int64_t i = 0; i < Dv; i++) {
                    float vi = vr[i];
                    o0[i] += p0 * vi;
                    o1[i] += p1 * vi;
                    o2[i] += p2 * vi;
                    o3[i] += p3 * vi;
                }
            }
            for (; g < G; g++) {
                float p = work[g * N + n];
                float *og = o + g * Dv;
#pragma omp simd
                for (int64_t i = 0; i < Dv; i++) og[i] += p * vr[i];
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *og = o + g * Dv;
            if (sum[g] > 0.f) {
                float inv = 1.f / sum[g];
#pragma omp simd
                for (int64_t i = 0; i < Dv; i++) og[i] *= inv;
                lse[bh * G + g] = mx[g] + logf(sum[g]);
            } else {
                lse[bh * G + g] = -INFINITY;
            }
        }
    }
}

/* The keys of core.selection's order: the score's order-preserving int32 image in the high
 * half, NB - 1 - j in the low half, so that equal scores go to the lower block index
 * (kernels/cpu.py _top_blocks computes the same keys). -0.0 counts as +0.0. */
static inline int64_t order_key(float score, int64_t j, int64_t NB) {
    int32_t bits;
    memcpy(&bits, &score, sizeof bits);
    if (bits == (int32_t)0x80000000) bits = 0;
    int64_t mono = bits < 0 ? (int64_t)(bits ^ 0x7FFFFFFF) : (int64_t)bits;
    return (int64_t)(((uint64_t)mono << 32) | (uint64_t)(NB - 1 - j));
}

static inline void sift_down(int64_t *heap, int64_t n, int64_t i) { /* min-heap */
    for (;;) {
        int64_t l = 2 * i + 1, m = i;
        if (l < n && heap[l] < heap[m]) m = l;
        if (l + 1 < n && heap[l + 1] < heap[m]) m = l + 1;
        if (m == i) return;
        int64_t t = heap[i];
        heap[i] = heap[m], heap[m] = t, i = m;
    }
}

/* core.selection.select for a planned step (kernels/cpu.py DecodeStep.keep): per (request b,
 * KV head h) the first K blocks of the score order (descending, ties to the lower index), kept
 * while their clipped lengths fit the block budget (stopping at the first that does not), laid
 * out after the fixed positions (sink + recent window).
 * scores, clen, cstart: [B, Hkv, NB] (clen 0 = not selectable); budget, front: [B];
 * fixed: [B, Hkv, cap + 1]; out: positions [B, Hkv, cap], counts [B, Hkv], order and kept
 * [B, Hkv, K]; heap: K int64 of work. */
void ds_keep(const float *scores, const int64_t *clen, const int64_t *cstart,
             const int64_t *budget, const int64_t *fixed, const int64_t *front,
             int64_t *positions, int64_t *counts, int64_t *order, int64_t *kept, int64_t *heap,
             int64_t B, int64_t Hkv, int64_t NB, int64_t K, int64_t cap) {
    for (int64_t bh = 0; bh < B * Hkv; bh++) {
        int64_t b = bh / Hkv;
        const float *s = scores + bh * NB;
        int64_t n = 0;
        for (int64_t j = 0; j < NB && K > 0; j++) { /* the K largest keys */
            int64_t key = order_key(s[j], j, NB);
            if (n < K) {
                heap[n++] = key;
                if (n == K)
                    for (int64_t i = K / 2 - 1; i >= 0; i--) sift_down(heap, K, i);
            } else if (key > heap[0]) {
                heap[0] = key;
                sift_down(heap, K, 0);
            }
        }
        int64_t *ord = order + bh * K, *kl = kept + bh * K, *pos = positions + bh * cap;
        for (int64_t i = K - 1; i >= 0; i--) { /* pop ascending: fill the order from its end */
            ord[i] = NB - 1 - (int64_t)((uint64_t)heap[0] & 0xFFFFFFFFu);
            heap[0] = heap[i];
            sift_down(heap, i, 0);
        }
        memcpy(pos, fixed + bh * (cap + 1), sizeof(int64_t) * cap);
        int64_t fill = 0, total = front[b];
        for (int64_t i = 0; i < K; i++) {
            int64_t len = clen[bh * NB + ord[i]];
            fill += len;
            kl[i] = fill <= budget[b] ? len : 0;
            int64_t at = front[b] + fill - len, start = cstart[bh * NB + ord[i]];
            for (int64_t t = 0; t < kl[i] && at + t < cap; t++)
                if (at + t >= 0) pos[at + t] = start + t;
            total += kl[i];
        }
        counts[bh] = total;
    }
}

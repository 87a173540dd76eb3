/* Fused CPU kernels for the planned decode step (kernels/native.py builds and loads this file).
 *
 * torch cannot fuse a row gather into a matmul: the torch path copies every selected K/V row and
 * every scattered summary row once, then re-reads it for a GEMM with M = G (4) rows. These loops
 * read each row once, straight from the pool / the summaries, and compute what the core twins
 * compute (core.selection.score_blocks, core.attention.sparse_decode_attention), prefetching the
 * rows a few entries ahead, since the gathered rows are scattered over the pool.
 *
 * fp32 only, contiguous inputs; kernels/native.py checks shapes, dtypes and index ranges before
 * every call, so nothing here reads outside its arguments.
 *
 * Threads: each call splits its work over T threads (the caller passes torch's thread count).
 * Built with -fopenmp, the library's libgomp.so.1 is the one torch already loaded (same soname),
 * so these loops run on torch's own OpenMP team: no second pool competing for the cores. The
 * scattered row reads are latency bound, and a second core doubles the reads in flight.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define THREAD() omp_get_thread_num()
#else
#define THREAD() 0
#endif

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

/* max over the G query heads g of a group (q: G rows of D) of one block's estimate:
 *   q·center + sqrt(sum_d q_d^2 radius_d^2)   (l2)
 *   q·center + sum_d |q_d| radius_d           (not l2) */
static inline float score_block(const float *q, const float *c, const float *r, int l2,
                                int64_t G, int64_t D) {
    float best = -INFINITY;
    for (int64_t g0 = 0; g0 < G; g0 += 4) { /* 4 query heads per pass over c, r */
        float e[4], w[4];
        dot4(q, c, D, g0, G, PLAIN, e);
        if (l2) {
            dot4(q, r, D, g0, G, SQUARED, w);
            for (int j = 0; j < 4; j++) w[j] = sqrtf(w[j]);
        } else {
            dot4(q, r, D, g0, G, ABS_Q, w);
        }
        for (int j = 0; j < 4 && g0 + j < G; j++) best = e[j] + w[j] > best ? e[j] + w[j] : best;
    }
    return best;
}

/* Block j of request b at every KV head: score[b, h, j] = score_block(...) + bias[b, j] (bias
 * NULL: + 0), with row = index[b, j]; 0 + bias where row < 0. */
static inline void score_column(const float *q, const float *center, const float *radius,
                                const int64_t *index, const uint8_t *l2, const float *bias,
                                float *score, int64_t b, int64_t j, int64_t Hkv, int64_t G,
                                int64_t D, int64_t NB) {
    const int64_t row = index[b * NB + j];
    const float add = bias ? bias[b * NB + j] : 0.f;
    if (SCORE_AHEAD && j + SCORE_AHEAD < NB && index[b * NB + j + SCORE_AHEAD] >= 0) {
        int64_t ahead = index[b * NB + j + SCORE_AHEAD];
        prefetch_row(center + ahead * Hkv * D, Hkv * D);
        prefetch_row(radius + ahead * Hkv * D, Hkv * D);
    }
    for (int64_t h = 0; h < Hkv; h++) {
        float s = row < 0 ? 0.f
                          : score_block(q + (b * Hkv + h) * G * D, center + (row * Hkv + h) * D,
                                        radius + (row * Hkv + h) * D, l2[b], G, D);
        score[(b * Hkv + h) * NB + j] = s + add;
    }
}

/* score[b, h, j] = score_block of the query heads of KV head h and block j of request b, with
 * row = index[b, j]; 0 where row < 0 (the caller's bias masks those).
 * q: [B, Hkv, G, D]; center, radius: [M, Hkv, D];
 * index: [B, NB]; l2: [B]; score: [B, Hkv, NB]. */
void ds_score(const float *q, const float *center,
              const float *radius, const int64_t *index, const uint8_t *l2, float *score,
              int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t NB, int64_t T) {
    (void)T;
#pragma omp parallel for collapse(2) schedule(static) num_threads(T) if (T > 1 && B * NB > 64)
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < NB; j++)
            score_column(q, center, radius, index, l2, NULL, score, b, j, Hkv, G, D, NB);
}

/* For each (request b, KV head h): softmax(scale * q_g · K[rows]) · V[rows] over the valid
 * entries of rows[b, h, :], for the G query heads g of the group.
 * q: [B, Hkv, G, D]; k: [R, D]; v: [R, Dv] (the pools as rows slot * Hkv + head);
 * rows, valid: [B, Hkv, N] (a negative row counts as padding); out: [B, Hkv, G, Dv];
 * lse: [B, Hkv, G] (natural log; -inf and a zero output where no entry is valid).
 * Each list is cut into S parts of `chunk` = ceil(N / S) entries (S > 1 where there are fewer
 * lists than threads to keep busy), attended apart and merged by their log-sum-exp.
 * work: T * G * (chunk + 2) floats, plus B * Hkv * S * G * (Dv + 2) where S > 1. */
#define USABLE(n) (ok[n] && rw[n] >= 0) /* an entry is attended: valid, and names a pool row */

/* Entries [lo, hi) of one list, per query head g: mx[g] (the largest logit), sum[g] and
 * acc[g, :] = sum of exp(logit - mx[g]) * V row (not normalised). logit: G * (hi - lo).
 * pre, has (NULL: none): entry n's q·k for the G heads at pre[n * G] where has[n], computed by
 * the selection (candidate_dots), so its K row is not read again. */
static void attend_part(const float *qg, const float *k, const float *v, const int64_t *rw,
                        const uint8_t *ok, const float *pre, const uint8_t *has, float scale,
                        int64_t G, int64_t D, int64_t Dv, int64_t lo, int64_t hi, float *logit,
                        float *acc, float *mx, float *sum) {
    const int64_t L = hi > lo ? hi - lo : 0;
    for (int64_t g = 0; g < G; g++) mx[g] = -INFINITY, sum[g] = 0.f;
    memset(acc, 0, sizeof(float) * G * Dv);
    for (int64_t n = lo; n < lo + L; n++) {
        const int known = has && has[n]; /* q·k already computed (two-stage selection) */
        if (n + AHEAD < hi && USABLE(n + AHEAD) && !(has && has[n + AHEAD]))
            prefetch_row(k + rw[n + AHEAD] * D, D);
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
            float e[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
            if (USABLE(n) && known)
                for (int j = 0; j < 4 && g0 + j < G; j++) e[j] = pre[n * G + g0 + j];
            else if (USABLE(n))
                dot4(qg, k + rw[n] * D, D, g0, G, PLAIN, e);
            for (int j = 0; j < 4 && g0 + j < G; j++) {
                float x = USABLE(n) ? scale * e[j] : -INFINITY;
                logit[(g0 + j) * L + n - lo] = x;
                mx[g0 + j] = x > mx[g0 + j] ? x : mx[g0 + j];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        if (mx[g] == -INFINITY) continue;
        for (int64_t n = lo; n < lo + L; n++) {
            float p = USABLE(n) ? expf(logit[g * L + n - lo] - mx[g]) : 0.f;
            logit[g * L + n - lo] = p;
            sum[g] += p;
        }
    }
    for (int64_t n = lo; n < lo + L; n++) {
        if (n + AHEAD < hi && USABLE(n + AHEAD)) prefetch_row(v + rw[n + AHEAD] * Dv, Dv);
        if (!USABLE(n)) continue;
        const float *vr = v + rw[n] * Dv;
        const float *p = logit + n - lo;
        int64_t g = 0;
        for (; g + 4 <= G; g += 4) { /* 4 query heads per pass over the V row */
            float p0 = p[g * L], p1 = p[(g + 1) * L], p2 = p[(g + 2) * L], p3 = p[(g + 3) * L];
            float *o0 = acc + g * Dv, *o1 = o0 + Dv, *o2 = o1 + Dv, *o3 = o2 + Dv;
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
            float pg = p[g * L];
            float *og = acc + g * Dv;
#pragma omp simd
            for (int64_t i = 0; i < Dv; i++) og[i] += pg * vr[i];
        }
    }
}

/* out[g, :] and lse[g] of one list from its S parts (part s: acc G * Dv, mx G, sum G). */
static void merge_parts(const float *part, int64_t S, int64_t G, int64_t Dv, float *out,
                        float *lse) {
    const int64_t stride = G * (Dv + 2);
    for (int64_t g = 0; g < G; g++) {
        float top = -INFINITY, total = 0.f;
        for (int64_t s = 0; s < S; s++) {
            float m = part[s * stride + G * Dv + g];
            top = m > top ? m : top;
        }
        float *og = out + g * Dv;
        memset(og, 0, sizeof(float) * Dv);
        if (top == -INFINITY) {
            lse[g] = -INFINITY;
            continue;
        }
        for (int64_t s = 0; s < S; s++) {
            const float *ps = part + s * stride;
            float m = ps[G * Dv + g];
            if (m == -INFINITY) continue;
            float w = expf(m - top);
            total += w * ps[G * Dv + G + g];
#pragma omp simd
            for (int64_t i = 0; i < Dv; i++) og[i] += w * ps[g * Dv + i];
        }
        float inv = 1.f / total;
#pragma omp simd
        for (int64_t i = 0; i < Dv; i++) og[i] *= inv;
        lse[g] = top + logf(total);
    }
}

/* The list's output from its one part, in place: acc / sum, lse = mx + log(sum). */
static void normalise(float *acc, const float *mx, const float *sum, int64_t G, int64_t Dv,
                      float *lse) {
    for (int64_t g = 0; g < G; g++) {
        float *og = acc + g * Dv;
        if (sum[g] > 0.f) {
            float inv = 1.f / sum[g];
#pragma omp simd
            for (int64_t i = 0; i < Dv; i++) og[i] *= inv;
            lse[g] = mx[g] + logf(sum[g]);
        } else {
            lse[g] = -INFINITY;
        }
    }
}

/* Part u of ds_attend's B * Hkv * S parts (a list when S == 1, normalised then). */
static void attend_unit(const float *q, const float *k, const float *v, const int64_t *rows,
                        const uint8_t *valid, const float *pre, const uint8_t *has, float *out,
                        float *lse, float *work, float scale, int64_t G, int64_t D, int64_t Dv,
                        int64_t N, int64_t S, int64_t T, int64_t u) {
    const int64_t chunk = (N + S - 1) / S, bh = u / S, lo = (u % S) * chunk;
    const int64_t hi = lo + chunk < N ? lo + chunk : N;
    float *logit = work + THREAD() * G * (chunk + 2);
    float *part = work + T * G * (chunk + 2) + u * G * (Dv + 2);
    float *acc = S == 1 ? out + bh * G * Dv : part;
    float *mx = S == 1 ? logit + G * chunk : acc + G * Dv;
    attend_part(q + bh * G * D, k, v, rows + bh * N, valid + bh * N,
                pre ? pre + bh * N * G : NULL, has ? has + bh * N : NULL, scale, G, D, Dv, lo,
                hi, logit, acc, mx, mx + G);
    if (S == 1) normalise(acc, mx, mx + G, G, Dv, lse + bh * G);
}

static inline void merge_list(const float *work, float *out, float *lse, int64_t G, int64_t Dv,
                              int64_t N, int64_t S, int64_t T, int64_t bh) {
    const int64_t chunk = (N + S - 1) / S, stride = G * (Dv + 2);
    merge_parts(work + T * G * (chunk + 2) + bh * S * stride, S, G, Dv, out + bh * G * Dv,
                lse + bh * G);
}

/* The attention of all L = B * Hkv lists: their parts, then the merges. Called inside a
 * parallel region (its loops are shared among the region's threads) or outside one. */
static void attend_lists(const float *q, const float *k, const float *v, const int64_t *rows,
                         const uint8_t *valid, const float *pre, const uint8_t *has, float *out,
                         float *lse, float *work, float scale, int64_t L, int64_t G, int64_t D,
                         int64_t Dv, int64_t N, int64_t S, int64_t T) {
#pragma omp for schedule(static)
    for (int64_t u = 0; u < L * S; u++)
        attend_unit(q, k, v, rows, valid, pre, has, out, lse, work, scale, G, D, Dv, N, S, T, u);
    if (S > 1) {
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < L; bh++) merge_list(work, out, lse, G, Dv, N, S, T, bh);
    }
}

void ds_attend(const float *q, const float *k, const float *v, const int64_t *rows,
               const uint8_t *valid, float *out, float *lse, float *work, float scale,
               int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t Dv, int64_t N, int64_t S,
               int64_t T) {
#pragma omp parallel num_threads(T) if (T > 1 && B * Hkv * S > 1)
    attend_lists(q, k, v, rows, valid, NULL, NULL, out, lse, work, scale, B * Hkv, G, D, Dv, N,
                 S, T);
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

/* The first K blocks of one score order (descending, ties to the lower block index) into ord,
 * by a min-heap of K keys (heap: K int64 of work). */
static void top_blocks(const float *s, int64_t NB, int64_t K, int64_t *heap, int64_t *ord) {
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
    for (int64_t i = K - 1; i >= 0; i--) { /* pop ascending: fill the order from its end */
        ord[i] = NB - 1 - (int64_t)((uint64_t)heap[0] & 0xFFFFFFFFu);
        heap[0] = heap[i];
        sift_down(heap, i, 0);
    }
}

/* A block's tokens that a selection may keep: its clipped length, 0 where its score is not
 * finite (core.selection.select keeps no block scored -inf). */
static inline int64_t selectable_len(float score, int64_t clen) {
    return isfinite(score) ? clen : 0;
}

/* core.selection.select for a planned step (kernels/cpu.py DecodeStep.keep): per (request b,
 * KV head h) the first K blocks of the score order (descending, ties to the lower index), kept
 * while their clipped lengths fit the block budget (stopping at the first that does not), laid
 * out after the fixed positions (sink + recent window).
 * scores, clen, cstart: [B, Hkv, NB] (clen 0 = not selectable); budget, front: [B];
 * fixed: [B, Hkv, cap + 1]; out: positions [B, Hkv, cap], counts [B, Hkv], order and kept
 * [B, Hkv, K]; heap: T * K int64 of work. */
static void keep_list(const float *scores, const int64_t *clen, const int64_t *cstart,
                      const int64_t *budget, const int64_t *fixed, const int64_t *front,
                      int64_t *positions, int64_t *counts, int64_t *order, int64_t *kept,
                      int64_t *heap, int64_t bh, int64_t Hkv, int64_t NB, int64_t K, int64_t cap) {
    int64_t b = bh / Hkv;
    const float *s = scores + bh * NB;
    int64_t *ord = order + bh * K, *kl = kept + bh * K, *pos = positions + bh * cap;
    top_blocks(s, NB, K, heap, ord);
    memcpy(pos, fixed + bh * (cap + 1), sizeof(int64_t) * cap);
    int64_t fill = 0, total = front[b];
    for (int64_t i = 0; i < K; i++) {
        int64_t len = selectable_len(s[ord[i]], clen[bh * NB + ord[i]]);
        fill += len;
        kl[i] = fill <= budget[b] ? len : 0;
        int64_t at = front[b] + fill - len, start = cstart[bh * NB + ord[i]];
        for (int64_t t = 0; t < kl[i] && at + t < cap; t++)
            if (at + t >= 0) pos[at + t] = start + t;
        total += kl[i];
    }
    counts[bh] = total;
}

/* The first stage of core.selection.select_refined, in three steps so that the key reads (the
 * bulk of it) are shared evenly among the threads whatever the number of lists:
 *
 * candidates (per list bh): the estimate's candidates for the block budget cbudget[b] (the
 * first Kc blocks of its order while they fit) into cord [B, Hkv, Kc] (cnt[bh]: how many), and
 * their tokens' pool rows, laid end to end in that order, into crow [B, Hkv, CL] (-1: a
 * position not held; ctok[bh]: how many); block j's first token at coff[B, Hkv, NB] (-1: not a
 * candidate); every exact score -inf. work: Kc int64.
 * candidate_dots (per part of a list's tokens, S parts as the attention's, so that 3 KV heads
 * on 2 threads keep both busy): the q·k of those tokens for the G query heads,
 * into clog [B, Hkv, CL, G] (-inf where not held), the keys prefetched AHEAD rows ahead across
 * block ends (the candidates are scattered over the pool).
 * exact_maxima (per list): each candidate's largest q·k over its tokens and heads, into exact
 * [B, Hkv, NB]. The attention then reuses the kept keys' q·k from clog (reuse_logits). */
static void candidates(const float *scores, const int64_t *clen, const int64_t *cstart,
                       const int64_t *cbudget, const int64_t *pool_rows, const uint8_t *slot_ok,
                       float *exact, int64_t *coff, int64_t *cord, int64_t *cnt, int64_t *crow,
                       int64_t *ctok, int64_t *work, int64_t bh, int64_t Hkv, int64_t NB,
                       int64_t Kc, int64_t P, int64_t CL) {
    const float *s = scores + bh * NB;
    const int64_t *pr = pool_rows + bh * P;
    const uint8_t *held = slot_ok ? slot_ok + bh * P : NULL;
    float *ex = exact + bh * NB;
    int64_t *ord = cord + bh * Kc, *off = coff + bh * NB, *rw = crow + bh * CL;
    for (int64_t j = 0; j < NB; j++) ex[j] = -INFINITY, off[j] = -1;
    top_blocks(s, NB, Kc, work, ord);
    int64_t fill = 0, i = 0;
    for (; i < Kc; i++) {
        int64_t j = ord[i], len = selectable_len(s[j], clen[bh * NB + j]);
        if (fill + len > cbudget[bh / Hkv] || fill + len > CL) break; /* the greedy prefix */
        off[j] = fill;
        for (int64_t t = 0; t < len; t++) {
            int64_t col = cstart[bh * NB + j] + t + 1;
            rw[fill + t] = col < 1 || col >= P || (held && !held[col]) ? -1 : pr[col];
        }
        fill += len;
    }
    cnt[bh] = i;
    ctok[bh] = fill;
}

static void candidate_dots(const float *q, const float *k, const int64_t *crow,
                           const int64_t *ctok, float *clog, int64_t bh, int64_t lo_part,
                           int64_t parts, int64_t G, int64_t D, int64_t CL) {
    const int64_t N = ctok[bh], chunk = (N + parts - 1) / parts, lo = lo_part * chunk;
    const int64_t hi = lo + chunk < N ? lo + chunk : N;
    const int64_t *rw = crow + bh * CL;
    const float *qg = q + bh * G * D;
    float *lg = clog + bh * CL * G;
    for (int64_t n = lo; n < lo + AHEAD && n < hi; n++)
        if (rw[n] >= 0) prefetch_row(k + rw[n] * D, D);
    for (int64_t n = lo; n < hi; n++) {
        if (n + AHEAD < hi && rw[n + AHEAD] >= 0) prefetch_row(k + rw[n + AHEAD] * D, D);
        float *e = lg + n * G;
        if (rw[n] < 0) {
            for (int64_t g = 0; g < G; g++) e[g] = -INFINITY;
            continue;
        }
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
            float e4[4];
            dot4(qg, k + rw[n] * D, D, g0, G, PLAIN, e4);
            for (int c = 0; c < 4 && g0 + c < G; c++) e[g0 + c] = e4[c];
        }
    }
}

static void exact_maxima(const float *scores, const int64_t *clen, const float *clog,
                         const int64_t *coff, const int64_t *cord, const int64_t *cnt,
                         float *exact, int64_t bh, int64_t NB, int64_t Kc, int64_t G,
                         int64_t CL) {
    const float *s = scores + bh * NB, *lg = clog + bh * CL * G;
    const int64_t *ord = cord + bh * Kc;
    for (int64_t i = 0; i < cnt[bh]; i++) {
        int64_t j = ord[i], len = selectable_len(s[j], clen[bh * NB + j]);
        const float *e = lg + coff[bh * NB + j] * G;
        float best = -INFINITY;
        for (int64_t x = 0; x < len * G; x++) best = e[x] > best ? e[x] : best;
        exact[bh * NB + j] = best;
    }
}

/* After keep_list on the exact scores of list bh: the kept blocks' q·k from clog, laid out as
 * their positions are (pre [B, Hkv, cap, G], has [B, Hkv, cap]: 1 where pre holds the entry's
 * q·k), so the attention reads no kept key twice. */
static void reuse_logits(const int64_t *order, const int64_t *kept, const int64_t *front,
                         const float *clog, const int64_t *coff, float *pre, uint8_t *has,
                         int64_t bh, int64_t Hkv, int64_t NB, int64_t K, int64_t cap, int64_t G,
                         int64_t CL) {
    const int64_t *ord = order + bh * K, *kl = kept + bh * K, *off = coff + bh * NB;
    const float *lg = clog + bh * CL * G;
    float *pl = pre + bh * cap * G;
    uint8_t *hl = has + bh * cap;
    memset(hl, 0, (size_t)cap);
    int64_t at = front[bh / Hkv];
    for (int64_t i = 0; i < K && kl[i] > 0; i++) {
        const int64_t o = off[ord[i]];
        for (int64_t t = 0; t < kl[i] && at + t < cap; t++) {
            if (o < 0 || at + t < 0) continue;
            memcpy(pl + (at + t) * G, lg + (o + t) * G, sizeof(float) * G);
            hl[at + t] = 1;
        }
        at += kl[i];
    }
}

void ds_keep(const float *scores, const int64_t *clen, const int64_t *cstart,
             const int64_t *budget, const int64_t *fixed, const int64_t *front,
             int64_t *positions, int64_t *counts, int64_t *order, int64_t *kept, int64_t *heaps,
             int64_t B, int64_t Hkv, int64_t NB, int64_t K, int64_t cap, int64_t T) {
    (void)T;
#pragma omp parallel for schedule(static) num_threads(T) if (T > 1 && B * Hkv > 1)
    for (int64_t bh = 0; bh < B * Hkv; bh++)
        keep_list(scores, clen, cstart, budget, fixed, front, positions, counts, order, kept,
                  heaps + THREAD() * K, bh, Hkv, NB, K, cap);
}

/* One compressed layer of a planned step in one call (kernels/cpu.py DecodeStep.run):
 * ds_score (+ the plan's bias), ds_keep, each kept position's pool row, then ds_attend, in one
 * parallel region. The plan's tensors are fixed for the step; q, the summaries, the pools and
 * the outputs change per layer. Shapes as in the three calls above; pool_rows, slot_ok:
 * [B, Hkv, P] (position p at column p + 1; slot_ok NULL: every slot is held); rows, valid:
 * [B, Hkv, cap] of work; scores [B, Hkv, NB]; heaps T * K; work as ds_attend's.
 * attend == 0: the selection alone (score, keep), for SparseDecodeWrapper.select.
 * cbudget non-NULL: two-stage selection (core.selection.select_refined): the score's
 * candidates for cbudget [B] (the first Kc blocks of its order) are ranked by exact_maxima
 * into exact [B, Hkv, NB] (k is read, also when attend == 0), and keep runs on those; cheaps:
 * T * Kc int64 of work; clog, coff, cord, cnt, crow, ctok: the candidate stage's buffers (CL:
 * the largest candidate budget), pre, has: reuse_logits', through which the attention reuses
 * the kept keys' q·k. */
typedef struct {
    const float *q, *center, *radius, *k, *v;
    float *out, *lse;
    int64_t *positions, *counts, *order, *kept;
    const int64_t *index;
    const uint8_t *l2;
    const float *bias;
    const int64_t *clen, *cstart, *budget, *fixed, *front, *pool_rows;
    const uint8_t *slot_ok;
    float *scores, *work;
    int64_t *heaps, *rows;
    uint8_t *valid;
    const int64_t *cbudget;
    float *exact, *clog, *pre;
    int64_t *cheaps, *coff;
    uint8_t *has;
    int64_t *cord, *cnt, *crow, *ctok;
    float scale;
    int64_t B, Hkv, G, D, Dv, NB, K, cap, P, S, T, Kc, CL;
    int64_t attend; /* 0: the selection only (q, summaries and the selection's outputs) */
} ds_layer_args;

void ds_layer(const ds_layer_args *a) {
    const int64_t B = a->B, Hkv = a->Hkv, NB = a->NB, cap = a->cap, P = a->P, T = a->T;
#pragma omp parallel num_threads(T) if (T > 1)
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < NB; j++)
                score_column(a->q, a->center, a->radius, a->index, a->l2, a->bias, a->scores, b,
                             j, Hkv, a->G, a->D, NB);
        if (a->cbudget) { /* two-stage selection: candidates, their keys' q·k, maxima */
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * Hkv; bh++)
                candidates(a->scores, a->clen, a->cstart, a->cbudget, a->pool_rows, a->slot_ok,
                           a->exact, a->coff, a->cord, a->cnt, a->crow, a->ctok,
                           a->cheaps + THREAD() * a->Kc, bh, Hkv, NB, a->Kc, P, a->CL);
#pragma omp for schedule(static)
            for (int64_t u = 0; u < B * Hkv * a->S; u++) /* the attention's S parts per list */
                candidate_dots(a->q, a->k, a->crow, a->ctok, a->clog, u / a->S, u % a->S, a->S,
                               a->G, a->D, a->CL);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * Hkv; bh++) {
            const float *keyed = a->scores;
            if (a->cbudget) {
                exact_maxima(a->scores, a->clen, a->clog, a->coff, a->cord, a->cnt, a->exact,
                             bh, NB, a->Kc, a->G, a->CL);
                keyed = a->exact;
            }
            keep_list(keyed, a->clen, a->cstart, a->budget, a->fixed, a->front,
                      a->positions, a->counts, a->order, a->kept, a->heaps + THREAD() * a->K, bh,
                      Hkv, NB, a->K, cap);
            if (!a->attend) continue;
            if (a->cbudget)
                reuse_logits(a->order, a->kept, a->front, a->clog, a->coff, a->pre, a->has, bh,
                             Hkv, NB, a->K, cap, a->G, a->CL);
            const int64_t *pos = a->positions + bh * cap, *pr = a->pool_rows + bh * P;
            const uint8_t *held = a->slot_ok ? a->slot_ok + bh * P : NULL;
            for (int64_t n = 0; n < cap; n++) { /* position -> pool row (-1: padding) */
                int64_t col = pos[n] + 1;
                int ok = col >= 1 && col < P && (!held || held[col]);
                a->rows[bh * cap + n] = ok ? pr[col] : -1;
                a->valid[bh * cap + n] = (uint8_t)ok;
            }
        }
        if (a->attend)
            attend_lists(a->q, a->k, a->v, a->rows, a->valid, a->cbudget ? a->pre : NULL,
                         a->cbudget ? a->has : NULL, a->out, a->lse, a->work, a->scale, B * Hkv,
                         a->G, a->D, a->Dv, cap, a->S, T);
    }
}

/* mnistkit's CPU kernels: BatchNorm (training mode), alone or fused with the ReLU after it, for
 * channels-last tensors; and Dropout's mask drawn with a counter-based generator (at the end).
 *
 * Why: PyTorch's CPU BatchNorm for channels-last data vectorises over the channels in groups of
 * 16, so the channel counts of mnistkit's models (6, 10, 12, 14, 18, 20, 24, 26) run partly
 * scalar, and BN+ReLU forward and backward took a third of I3's training step. Here a tensor of
 * M rows (N*H*W) by C channels is walked as a flat array in periods of L = lcm(C, 16) values, so
 * every inner loop runs over whole vectors whatever C is, and the ReLU and its mask ride along.
 *
 * One thread: each pass is memory-bound and takes about a millisecond; a second thread (a pthread
 * per call) made whole training steps 3-12% slower on the 2-core machine it was measured on, as
 * PyTorch's own threads spin between ops.
 *
 * Numerics: per-period sums in float over fixed chunks, the chunks added in double in order;
 * statistics are shifted by the
 * mean of 64 rows spread over the tensor (the first row alone is a poor guess after a ReLU, where the
 * cancellation cost 6e-6 of the variance) to avoid cancellation; bfloat16 is rounded to nearest even. Compiled with
 * -ffp-contract=off so that the forward pass and the backward pass compute the same
 * pre-activation, bit for bit, and agree on the ReLU mask.
 *
 * Loaded with ctypes by mnistkit/backends/fused.py, which falls back to PyTorch's own BatchNorm and ReLU
 * when no C compiler is there or a shape is not supported.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LMAX 1024        /* the longest period: C <= 64 */
#define CHUNK 2048       /* values per chunk (about), fixed: the summation order depends on it */

static int gcd(int a, int b) { while (b) { int t = a % b; a = b; b = t; } return a; }
static int period(int C) { return C * 16 / gcd(C, 16); }

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef struct {
    const void *x, *dy; void *out;
    int64_t M; int C, L; int64_t periods, per_chunk;
    float sh[LMAX], sc[LMAX], of[LMAX], mu[LMAX], is[LMAX], k1[LMAX], mg[LMAX], mgx[LMAX];
    float *part_a, *part_b;   /* [chunk][C] */
} ctx_t;

static void expand(float *dst, const float *src, int C, int L) { for (int k = 0; k < L; k++) dst[k] = src[k % C]; }

/* The loops, once per element type: T is the stored type, LOAD/STORE convert. */
#define DEFINE_STATS(SUF, T, LOAD)                                                        \
static void stats_##SUF(void *p, int64_t c0, int64_t c1) {                                        \
    ctx_t *c = (ctx_t *)p; const T *x = (const T *)c->x; const int L = c->L, C = c->C;              \
    float a[LMAX], q[LMAX];                                                                       \
    for (int64_t ch = c0; ch < c1; ch++) {                                                        \
        int64_t p0 = ch * c->per_chunk, p1 = p0 + c->per_chunk;                                   \
        if (p1 > c->periods) p1 = c->periods;                                                     \
        for (int k = 0; k < L; k++) { a[k] = 0.f; q[k] = 0.f; }                                   \
        for (int64_t pp = p0; pp < p1; pp++) {                                                    \
            const T *xp = x + pp * L;                                                             \
            for (int k = 0; k < L; k++) { float v = LOAD(xp[k]) - c->sh[k]; a[k] += v; q[k] += v * v; } \
        }                                                                                         \
        float *pa = c->part_a + ch * C, *pq = c->part_b + ch * C;                                 \
        for (int j = 0; j < C; j++) { pa[j] = 0.f; pq[j] = 0.f; }                                 \
        for (int k = 0; k < L; k++) { pa[k % C] += a[k]; pq[k % C] += q[k]; }                     \
    }                                                                                             \
}

/* The passes, once per element type and activation: RELU 1 is relu(batch_norm(x)), 0 batch_norm(x). */
#define DEFINE_KERNELS(SUF, T, LOAD, STORE, RELU)                                                  \
static void fwd_##SUF(void *p, int64_t c0, int64_t c1) {                                          \
    ctx_t *c = (ctx_t *)p; const T *x = (const T *)c->x; T *y = (T *)c->out; const int L = c->L;    \
    int64_t p0 = c0 * c->per_chunk, p1 = c1 * c->per_chunk;                                       \
    if (p1 > c->periods) p1 = c->periods;                                                         \
    for (int64_t pp = p0; pp < p1; pp++) {                                                        \
        const T *xp = x + pp * L; T *yp = y + pp * L;                                             \
        for (int k = 0; k < L; k++) { float t = LOAD(xp[k]) * c->sc[k] + c->of[k]; yp[k] = STORE(RELU ? (t > 0.f ? t : 0.f) : t); } \
    }                                                                                             \
}                                                                                                 \
static void bwdr_##SUF(void *p, int64_t c0, int64_t c1) {                                         \
    ctx_t *c = (ctx_t *)p; const T *x = (const T *)c->x, *dy = (const T *)c->dy;                    \
    const int L = c->L, C = c->C; float a[LMAX], q[LMAX];                                         \
    for (int64_t ch = c0; ch < c1; ch++) {                                                        \
        int64_t p0 = ch * c->per_chunk, p1 = p0 + c->per_chunk;                                   \
        if (p1 > c->periods) p1 = c->periods;                                                     \
        for (int k = 0; k < L; k++) { a[k] = 0.f; q[k] = 0.f; }                                   \
        for (int64_t pp = p0; pp < p1; pp++) {                                                    \
            const T *xp = x + pp * L, *gp = dy + pp * L;                                          \
            for (int k = 0; k < L; k++) {                                                         \
                float xv = LOAD(xp[k]); float t = xv * c->sc[k] + c->of[k];                       \
                float g = (!RELU || t > 0.f) ? LOAD(gp[k]) : 0.f; float xh = (xv - c->mu[k]) * c->is[k];     \
                a[k] += g; q[k] += g * xh;                                                        \
            }                                                                                     \
        }                                                                                         \
        float *pa = c->part_a + ch * C, *pq = c->part_b + ch * C;                                 \
        for (int j = 0; j < C; j++) { pa[j] = 0.f; pq[j] = 0.f; }                                 \
        for (int k = 0; k < L; k++) { pa[k % C] += a[k]; pq[k % C] += q[k]; }                     \
    }                                                                                             \
}                                                                                                 \
static void bwda_##SUF(void *p, int64_t c0, int64_t c1) {                                         \
    ctx_t *c = (ctx_t *)p; const T *x = (const T *)c->x, *dy = (const T *)c->dy; T *dx = (T *)c->out; \
    const int L = c->L; int64_t p0 = c0 * c->per_chunk, p1 = c1 * c->per_chunk;                   \
    if (p1 > c->periods) p1 = c->periods;                                                         \
    for (int64_t pp = p0; pp < p1; pp++) {                                                        \
        const T *xp = x + pp * L, *gp = dy + pp * L; T *op = dx + pp * L;                         \
        for (int k = 0; k < L; k++) {                                                             \
            float xv = LOAD(xp[k]); float t = xv * c->sc[k] + c->of[k];                           \
            float g = (!RELU || t > 0.f) ? LOAD(gp[k]) : 0.f; float xh = (xv - c->mu[k]) * c->is[k];         \
            op[k] = STORE(c->k1[k] * (g - c->mg[k] - xh * c->mgx[k]));                            \
        }                                                                                         \
    }                                                                                             \
}

#define LOAD_F(v) (v)
#define STORE_F(v) (v)
DEFINE_STATS(f32, float, LOAD_F)
DEFINE_STATS(bf16, uint16_t, bf2f)
DEFINE_KERNELS(f32, float, LOAD_F, STORE_F, 1)
DEFINE_KERNELS(bf16, uint16_t, bf2f, f2bf, 1)
DEFINE_KERNELS(f32_id, float, LOAD_F, STORE_F, 0)
DEFINE_KERNELS(bf16_id, uint16_t, bf2f, f2bf, 0)

/* Element i of the flat array, for the tail that does not fill a period. */
static inline float load_any(const void *p, int bf, int64_t i) {
    return bf ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void store_any(void *p, int bf, int64_t i, float v) {
    if (bf) ((uint16_t *)p)[i] = f2bf(v); else ((float *)p)[i] = v;
}

static int setup(ctx_t *c, int64_t M, int C, int with_parts) {
    if (C < 1 || M < 1 || period(C) > LMAX) return -1;
    c->M = M; c->C = C; c->L = period(C);
    c->periods = (M * C) / c->L;
    c->per_chunk = CHUNK / c->L > 0 ? CHUNK / c->L : 1;
    c->part_a = c->part_b = NULL;
    if (with_parts) {
        int64_t n = (c->periods + c->per_chunk - 1) / c->per_chunk;
        c->part_a = (float *)malloc(sizeof(float) * (size_t)((n > 0 ? n : 1) * C));
        c->part_b = (float *)malloc(sizeof(float) * (size_t)((n > 0 ? n : 1) * C));
        if (!c->part_a || !c->part_b) { free(c->part_a); free(c->part_b); return -2; }
    }
    return 0;
}
static int64_t nchunks(const ctx_t *c) { return (c->periods + c->per_chunk - 1) / c->per_chunk; }
static void done(ctx_t *c) { free(c->part_a); free(c->part_b); }

/* Per-channel sums of (x - shift) and (x - shift)^2 in double, shift being an estimate of the mean
 * (64 rows spread evenly over the tensor, in float): what
 * bnr_stats turns into mean and variance. */
static int shifted_sums(const void *x, int bf, int64_t M, int C, float *shift, double *s, double *q) {
    if (C < 1 || C > 64) return -1;   /* the callers' per-channel arrays hold 64 */
    ctx_t *c = (ctx_t *)calloc(1, sizeof(ctx_t));
    if (!c) return -2;
    int rc = setup(c, M, C, 1);
    if (rc) { free(c); return rc; }
    c->x = x;
    int64_t R = M < 64 ? M : 64;
    for (int j = 0; j < C; j++) {
        double t = 0;
        for (int64_t r = 0; r < R; r++) t += load_any(x, bf, (r * M / R) * C + j);
        shift[j] = (float)(t / (double)R);
    }
    expand(c->sh, shift, C, c->L);
    int64_t n = nchunks(c);
    (bf ? stats_bf16 : stats_f32)(c, 0, n);
    for (int j = 0; j < C; j++) { s[j] = 0; q[j] = 0; }
    for (int64_t ch = 0; ch < n; ch++)
        for (int j = 0; j < C; j++) { s[j] += c->part_a[ch * C + j]; q[j] += c->part_b[ch * C + j]; }
    for (int64_t i = c->periods * c->L; i < M * C; i++) {
        int j = (int)(i % C); double v = (double)load_any(x, bf, i) - shift[j]; s[j] += v; q[j] += v * v;
    }
    done(c); free(c);
    return 0;
}

/* Batch statistics: mean and biased variance per channel. */
int bnr_stats(const void *x, int bf, int64_t M, int C, float *mean, float *var) {
    float shift[64]; double s[64], q[64];
    int rc = shifted_sums(x, bf, M, C, shift, s, q);
    if (rc) return rc;
    for (int j = 0; j < C; j++) {
        double m = s[j] / (double)M, v = q[j] / (double)M - m * m;
        mean[j] = (float)(m + shift[j]); var[j] = (float)(v > 0 ? v : 0);
    }
    return 0;
}

/* y = relu(x * scale + shift) (relu 0: without the ReLU), scale and shift per channel. */
int bnr_forward(const void *x, void *y, int bf, int relu, int64_t M, int C, const float *scale, const float *shift) {
    ctx_t *c = (ctx_t *)calloc(1, sizeof(ctx_t));
    if (!c) return -2;
    int rc = setup(c, M, C, 0);
    if (rc) { free(c); return rc; }
    c->x = x; c->out = y;
    expand(c->sc, scale, C, c->L); expand(c->of, shift, C, c->L);
    (relu ? (bf ? fwd_bf16 : fwd_f32) : (bf ? fwd_bf16_id : fwd_f32_id))(c, 0, nchunks(c));
    for (int64_t i = c->periods * c->L; i < M * C; i++) {
        int j = (int)(i % C); float t = load_any(x, bf, i) * scale[j] + shift[j];
        store_any(y, bf, i, (!relu || t > 0.f) ? t : 0.f);
    }
    free(c);
    return 0;
}

/* The backward pass, first half: per channel, the sums over this tensor of g (the gradient that
 * passes the ReLU) and of g * xhat, in double. */
static int backward_sums(const void *x, const void *dy, int bf, int relu, int64_t M, int C, const float *scale,
                         const float *shift, const float *mean, const float *invstd, double *a, double *q) {
    ctx_t *c = (ctx_t *)calloc(1, sizeof(ctx_t));
    if (!c) return -2;
    if (C > 64) { free(c); return -1; }
    int rc = setup(c, M, C, 1);
    if (rc) { free(c); return rc; }
    c->x = x; c->dy = dy;
    expand(c->sc, scale, C, c->L); expand(c->of, shift, C, c->L);
    expand(c->mu, mean, C, c->L); expand(c->is, invstd, C, c->L);
    int64_t n = nchunks(c);
    (relu ? (bf ? bwdr_bf16 : bwdr_f32) : (bf ? bwdr_bf16_id : bwdr_f32_id))(c, 0, n);
    for (int j = 0; j < C; j++) { a[j] = 0; q[j] = 0; }
    for (int64_t ch = 0; ch < n; ch++)
        for (int j = 0; j < C; j++) { a[j] += c->part_a[ch * C + j]; q[j] += c->part_b[ch * C + j]; }
    for (int64_t i = c->periods * c->L; i < M * C; i++) {
        int j = (int)(i % C); float xv = load_any(x, bf, i); float t = xv * scale[j] + shift[j];
        float g = (!relu || t > 0.f) ? load_any(dy, bf, i) : 0.f; float xh = (xv - mean[j]) * invstd[j];
        a[j] += g; q[j] += (double)(g * xh);
    }
    done(c); free(c);
    return 0;
}

/* The backward pass, second half: dx = k1 * (g - mg - xhat * mgx), with k1 = weight * invstd and
 * mg, mgx the means of g and g * xhat over the whole batch. */
static int backward_apply(const void *x, const void *dy, void *dx, int bf, int relu, int64_t M, int C, const float *scale,
                          const float *shift, const float *mean, const float *invstd, const float *k1,
                          const float *mg, const float *mgx) {
    ctx_t *c = (ctx_t *)calloc(1, sizeof(ctx_t));
    if (!c) return -2;
    if (C > 64) { free(c); return -1; }
    int rc = setup(c, M, C, 0);
    if (rc) { free(c); return rc; }
    c->x = x; c->dy = dy; c->out = dx;
    expand(c->sc, scale, C, c->L); expand(c->of, shift, C, c->L);
    expand(c->mu, mean, C, c->L); expand(c->is, invstd, C, c->L);
    expand(c->k1, k1, C, c->L); expand(c->mg, mg, C, c->L); expand(c->mgx, mgx, C, c->L);
    (relu ? (bf ? bwda_bf16 : bwda_f32) : (bf ? bwda_bf16_id : bwda_f32_id))(c, 0, nchunks(c));
    for (int64_t i = c->periods * c->L; i < M * C; i++) {
        int j = (int)(i % C); float xv = load_any(x, bf, i); float t = xv * scale[j] + shift[j];
        float g = (!relu || t > 0.f) ? load_any(dy, bf, i) : 0.f; float xh = (xv - mean[j]) * invstd[j];
        store_any(dx, bf, i, k1[j] * (g - mg[j] - xh * mgx[j]));
    }
    free(c);
    return 0;
}

/* The backward pass of one whole batch: dx from dy, and the sums that make dweight (sum_gx) and
 * dbias (sum_g). */
int bnr_backward(const void *x, const void *dy, void *dx, int bf, int relu, int64_t M, int C, const float *scale,
                 const float *shift, const float *mean, const float *invstd, const float *weight,
                 float *sum_g, float *sum_gx) {
    double a[64], q[64];
    int rc = backward_sums(x, dy, bf, relu, M, C, scale, shift, mean, invstd, a, q);
    if (rc) return rc;
    float k1[64], mg[64], mgx[64];
    for (int j = 0; j < C; j++) {
        sum_g[j] = (float)a[j]; sum_gx[j] = (float)q[j];
        k1[j] = weight[j] * invstd[j]; mg[j] = (float)(a[j] / (double)M); mgx[j] = (float)(q[j] / (double)M);
    }
    return backward_apply(x, dy, dx, bf, relu, M, C, scale, shift, mean, invstd, k1, mg, mgx);
}

/* ------------------------------------------------------------------------------------------------
 * Dropout. PyTorch's CPU Dropout draws its mask with bernoulli_, which (off Intel CPUs, where it
 * does not use MKL) draws one Mersenne-Twister number per element on one thread: 8-12 ms for the
 * 2 million values of one [256, 10, 28, 28] activation, a third of a student model's step. Here
 * the mask comes from SplitMix64 over a counter (the 64-bit value i of a call is
 * mix(seed + (i + 1) * golden), two 32-bit draws each), which has no state to carry between
 * elements and vectorises: element i is kept where its draw is below `keep` (the keep
 * probability times 2^32), and scaled by `scale` (1 / (1 - p)). The seed of each call comes from
 * torch's generator (mnistkit/backends/dropout.py), so torch.manual_seed reproduces the masks.
 * The mask is kept as one byte per element for the backward pass.
 */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#define GOLDEN 0x9E3779B97F4A7C15ull

/* mask[i] = 1 where element i is kept (a loop of its own: it vectorises). */
static void drop_mask(uint8_t *restrict mask, int64_t n, uint64_t seed, uint32_t keep) {
    int64_t pairs = n / 2;
    for (int64_t i = 0; i < pairs; i++) {
        uint64_t h = mix64(seed + (uint64_t)(i + 1) * GOLDEN);
        mask[2 * i] = (uint32_t)h < keep;
        mask[2 * i + 1] = (uint32_t)(h >> 32) < keep;
    }
    if (n & 1) mask[n - 1] = (uint32_t)mix64(seed + (uint64_t)(pairs + 1) * GOLDEN) < keep;
}

/* y = x * mask * scale: the forward pass after the mask, and the backward pass with dy for x. */
static void drop_scale(const void *restrict x, void *restrict y, const uint8_t *restrict mask, int bf, int64_t n,
                       float scale) {
    if (bf) {
        const uint16_t *xs = (const uint16_t *)x; uint16_t *ys = (uint16_t *)y;
        for (int64_t i = 0; i < n; i++) ys[i] = f2bf(bf2f(xs[i]) * (mask[i] ? scale : 0.f));
    } else {
        const float *xs = (const float *)x; float *ys = (float *)y;
        for (int64_t i = 0; i < n; i++) ys[i] = xs[i] * (mask[i] ? scale : 0.f);
    }
}

int drop_forward(const void *x, void *y, uint8_t *mask, int bf, int64_t n, uint64_t seed, uint32_t keep, float scale) {
    if (n < 0) return -1;
    drop_mask(mask, n, seed, keep);
    drop_scale(x, y, mask, bf, n, scale);
    return 0;
}

int drop_backward(const void *dy, void *dx, const uint8_t *mask, int bf, int64_t n, float scale) {
    if (n < 0) return -1;
    drop_scale(dy, dx, mask, bf, n, scale);
    return 0;
}

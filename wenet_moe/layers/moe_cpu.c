/* Small-batch fp32 expert linears for MoE inference on the CPU.
 *
 * At streaming sizes an expert sees a handful of frames (16 frames x top-2 of 8
 * experts = 4 rows each), so its cost is reading its weights from memory. A GEMM
 * library's small-M kernels read them well below the copy bandwidth; this kernel
 * streams each weight once per tile of up to 12 rows, with all 12 x 32 outputs of a
 * column pair in registers, and while it works on one pair of column panels it
 * prefetches the next pair into L2 (one panel row of each per step). Without that
 * prefetch a single core reads ~15 GB/s at 4 rows; with it ~23 GB/s.
 *
 * Packed weight layout (one expert, logical W of shape K x N, y = x W + b):
 *   P[j][k][c] = W[k][16 j + c]   for j < N/16, k < K, c < 16
 * i.e. column blocks of 16, each a contiguous K x 16 panel. N must be a multiple of 16.
 * Built with -O3 -march=native by wenet_moe/layers/cpu_kernel.py; GCC vector
 * extensions map vec16 onto AVX-512, AVX2 or NEON registers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vec16 __attribute__((vector_size(64)));
typedef int32_t ivec16 __attribute__((vector_size(64)));

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_SILU = 2 };

#define MAX_TILE 12

static inline vec16 load16(const float *p) { vec16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, vec16 v) { memcpy(p, &v, sizeof v); }

static inline vec16 splat(float v) { return (vec16){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}; }
/* lanes of a where mask (all ones), else b; vector casts are bit reinterpretations */
static inline vec16 select16(ivec16 mask, vec16 a, vec16 b) {
    return (vec16)(((ivec16)a & mask) | ((ivec16)b & ~mask));
}

/* exp(x) to ~2 ulp (Cephes' expf: 2^n * polynomial on [-ln2/2, ln2/2]); x clamped
 * to [-87, 88], so the result stays finite and normal. */
static inline vec16 exp16(vec16 x) {
    x = select16(x < splat(-87.0f), splat(-87.0f), x);
    x = select16(x > splat(88.0f), splat(88.0f), x);
    const vec16 t = x * splat(1.44269504088896341f) + splat(0.5f);
    ivec16 n = __builtin_convertvector(t, ivec16);           /* truncation ... */
    n += (ivec16)(__builtin_convertvector(n, vec16) > t);    /* ... to floor (-1 where true) */
    const vec16 fn = __builtin_convertvector(n, vec16);
    const vec16 r = x - fn * splat(0.693359375f) + fn * splat(2.12194440e-4f);
    vec16 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    const ivec16 scale = (n + 127) << 23;
    vec16 two_n;
    memcpy(&two_n, &scale, sizeof two_n);
    return p * two_n;
}

static inline vec16 activate(vec16 v, const int act) {
    if (act == ACT_RELU) return select16(v < splat(0.0f), splat(0.0f), v);   /* NaN stays NaN */
    if (act == ACT_SILU)   /* below -87, x * sigmoid(x) underflows (|.| < 1e-36): 0 */
        return select16(v < splat(-87.0f), splat(0.0f), v / (splat(1.0f) + exp16(-v)));
    return v;
}

/* rows (<= MAX_TILE, a compile-time constant after inlining) rows of y = act(x W + b);
 * x is the tile transposed, xt[k * rows + m] (one contiguous stream of broadcasts:
 * rows 4 KB apart would share one L1 set and evict each other) */
static inline __attribute__((always_inline)) void tile(
        const float *xt, const int rows, const int K, const int N,
        const float *w, const float *b, float *y, int64_t ldy, const int act) {
    const int blocks = N / 16;
    int j = 0;
    for (; j + 2 <= blocks; j += 2) {
        const float *p0 = w + (int64_t)j * K * 16, *p1 = p0 + (int64_t)K * 16;
        const float *next = p1 + (int64_t)K * 16;   /* the next pair (or what follows) */
        const vec16 b0 = load16(b + 16 * j), b1 = load16(b + 16 * j + 16);
        vec16 a0[MAX_TILE], a1[MAX_TILE];
        for (int m = 0; m < rows; m++) { a0[m] = b0; a1[m] = b1; }
        for (int k = 0; k < K; k++) {
            __builtin_prefetch(next + 32 * k, 0, 1);        /* prefetcht2: into L2 */
            __builtin_prefetch(next + 32 * k + 16, 0, 1);
            const vec16 w0 = load16(p0 + 16 * k), w1 = load16(p1 + 16 * k);
            for (int m = 0; m < rows; m++) {
                const float xv = xt[k * rows + m];
                a0[m] += xv * w0;
                a1[m] += xv * w1;
            }
        }
        for (int m = 0; m < rows; m++) {
            store16(y + m * ldy + 16 * j, activate(a0[m], act));
            store16(y + m * ldy + 16 * j + 16, activate(a1[m], act));
        }
    }
    if (j < blocks) {   /* odd number of column blocks: the last one alone */
        const float *p0 = w + (int64_t)j * K * 16;
        const vec16 b0 = load16(b + 16 * j);
        vec16 a0[MAX_TILE];
        for (int m = 0; m < rows; m++) a0[m] = b0;
        for (int k = 0; k < K; k++) {
            __builtin_prefetch(p0 + (int64_t)K * 16 + 16 * k, 0, 1);
            const vec16 w0 = load16(p0 + 16 * k);
            for (int m = 0; m < rows; m++) a0[m] += xt[k * rows + m] * w0;
        }
        for (int m = 0; m < rows; m++) store16(y + m * ldy + 16 * j, activate(a0[m], act));
    }
}

#define TILE_CASE(R) case R: tile(xt, R, K, N, w, b, y, ldy, act); break;

/* y[0:rows] = act(x[0:rows] W + b), in the fewest tiles of up to MAX_TILE rows, of
 * balanced sizes (16 rows = 8 + 8, not 12 + 4: a tile costs at least one pass over W). */
static void linear_rows(const float *x, int64_t ldx, int64_t rows, int K, int N,
                        const float *w, const float *b, float *y, int64_t ldy, int act, float *xt) {
    while (rows > 0) {
        const int64_t tiles = (rows + MAX_TILE - 1) / MAX_TILE;
        const int r = (int)((rows + tiles - 1) / tiles);
        for (int m = 0; m < r; m++)
            for (int k = 0; k < K; k++) xt[k * r + m] = x[m * ldx + k];
        switch (r) {
            TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
            TILE_CASE(7) TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12)
            default: break;
        }
        x += r * ldx;
        y += r * ldy;
        rows -= r;
    }
}

int wm_abi_version(void) { return 4; }

/* For each segment s: rows [start[s], start[s] + count[s]) of x (ldx floats apart) go
 * through expert expert[s]: y rows = act(x rows W_e + b_e), W_e = w_packed + e*K*N
 * (packed as above), b_e = bias + e*N; y rows are ldy floats apart; act is ACT_NONE,
 * ACT_RELU or ACT_SILU (x * sigmoid(x)). Returns 0, or -2 when out of memory. */
int wm_segment_linear(const float *x, int64_t ldx, const int64_t *start, const int64_t *count,
                      const int64_t *expert, int64_t n_segments, int K, int N,
                      const float *w_packed, const float *bias, float *y, int64_t ldy, int act) {
    float *xt = malloc(sizeof(float) * MAX_TILE * (size_t)K);
    if (xt == NULL) return -2;
    for (int64_t s = 0; s < n_segments; s++) {
        const int64_t e = expert[s];
        linear_rows(x + start[s] * ldx, ldx, count[s], K, N, w_packed + e * (int64_t)K * N,
                    bias + e * (int64_t)N, y + start[s] * ldy, ldy, act, xt);
    }
    free(xt);
    return 0;
}

/* The whole MoE FFN for n_tok frames (inference), in one call:
 *   out[t] = sum_j gates[t, j] * expert_{top_idx[t, j]}(x[t])   for j < k,
 *   expert_e(v) = act(v W1_e + b1_e) W2_e + b2_e   (W1_e: dim x hidden, W2_e: hidden x dim,
 *   both packed as above; act is ACT_NONE, ACT_RELU or ACT_SILU).
 * The n_tok*k assignments are counting-sorted by expert (stable), their frames gathered
 * into expert-contiguous rows, each expert with rows runs its two linears on its slice,
 * and the gated rows are added back to their frames. Returns 0, -1 if an expert id is
 * outside [0, n_expert), -2 when out of memory (out is then not written).
 * Work space: x_sorted and y_sorted n_tok*k*dim floats each, h n_tok*k*hidden floats,
 * order n_tok*k + 2*n_expert int64. */
int wm_moe_forward(const float *x, int64_t n_tok, int dim, const int64_t *top_idx, const float *gates,
                   int k, int n_expert, int hidden, const float *w1_packed, const float *b1,
                   const float *w2_packed, const float *b2, int act, float *x_sorted, float *h,
                   float *y_sorted, int64_t *order, float *out) {
    const int64_t n_assign = n_tok * k;
    int64_t *start = order + n_assign, *fill = start + n_expert;
    for (int e = 0; e < n_expert; e++) start[e] = 0;
    for (int64_t a = 0; a < n_assign; a++) {
        if (top_idx[a] < 0 || top_idx[a] >= n_expert) return -1;
        start[top_idx[a]]++;
    }
    for (int64_t e = 0, sum = 0; e < n_expert; e++) {   /* counts -> starts */
        const int64_t count = start[e];
        start[e] = fill[e] = sum;
        sum += count;
    }
    for (int64_t a = 0; a < n_assign; a++) order[fill[top_idx[a]]++] = a;
    for (int64_t i = 0; i < n_assign; i++)
        memcpy(x_sorted + i * dim, x + (order[i] / k) * dim, sizeof(float) * (size_t)dim);
    float *xt = malloc(sizeof(float) * MAX_TILE * (size_t)(dim > hidden ? dim : hidden));
    if (xt == NULL) return -2;
    for (int e = 0; e < n_expert; e++) {
        const int64_t s = start[e], rows = fill[e] - start[e];
        if (rows == 0) continue;
        linear_rows(x_sorted + s * dim, dim, rows, dim, hidden, w1_packed + (int64_t)e * dim * hidden,
                    b1 + (int64_t)e * hidden, h + s * hidden, hidden, act, xt);
        linear_rows(h + s * hidden, hidden, rows, hidden, dim, w2_packed + (int64_t)e * hidden * dim,
                    b2 + (int64_t)e * dim, y_sorted + s * dim, dim, ACT_NONE, xt);
    }
    free(xt);
    memset(out, 0, sizeof(float) * (size_t)(n_tok * dim));
    for (int64_t i = 0; i < n_assign; i++) {
        const float g = gates[order[i]];
        float *o = out + (order[i] / k) * dim;
        const float *y = y_sorted + i * dim;
        for (int c = 0; c < dim; c++) o[c] += g * y[c];
    }
    return 0;
}

/* Small-batch fp32 expert linears for MoE inference on the CPU.
 *
 * At streaming sizes an expert sees a handful of frames (16 frames x top-2 of 8
 * experts = 4 rows each), so its cost is reading its weights from memory. A GEMM
 * library's small-M kernels read them well below the copy bandwidth; this kernel
 * streams each weight once per tile of up to 12 rows, with all 12 x 32 outputs of a
 * column pair in registers, and while it works on one pair of column panels it
 * prefetches the next two pairs into L2 (one panel row of each per step). Without that
 * prefetch a single core reads ~15 GB/s at 4 rows; with the next pair ~23 GB/s.
 *
 * Packed weight layout (one expert, logical W of shape K x N, y = x W + b):
 *   P[j][k][c] = W[k][16 j + c]   for j < N/16, k < K, c < 16
 * i.e. column blocks of 16, each a contiguous K x 16 panel. N must be a multiple of 16.
 * Weight element types (`wt`, moe_conf.expert_precision):
 *   WT_F32   float
 *   WT_BF16  bfloat16 bits (uint16, the top half of the float): widened to fp32 in
 *            registers by a shift, so any AVX2 / AVX-512 / NEON CPU runs it; half the
 *            bytes of fp32, and the activations stay fp32
 *   WT_I8    int8 with an fp32 scale per output column (symmetric, per output channel):
 *            y[n] = (sum_k x[k] q[k][n]) * scale[n] + b[n], q converted to fp32 in
 *            registers (weight-only quantization; a quarter of the bytes)
 *   WT_Q8    int8 weights as WT_I8, and int8 activations: each input row is quantized
 *            on entry (symmetric, one scale per row: s_x = max_k |x[k]| / 127,
 *            x_q = rint(x * (127 / max_k |x[k]|)), then x_q + 128 as uint8), so that
 *            y[n] = (sum_k (x_q[k] + 128) q[k][n] - 128 sum_k q[k][n]) * s_x * scale[n] + b[n]
 *            is an int32 dot product: AVX512-VNNI / AVX-VNNI `vpdpbusd` (64 products per
 *            instruction) where the build has it, else the same integer sums by shifts
 *            and multiplies (exact either way, so every CPU gives the same int32 sums).
 *            Layout by groups of 4 k: P[j][k/4][c][k%4] = q[k][16 j + c] (K % 16 == 0);
 *            per expert `scale` holds 2N words: the N column scales (float), then the
 *            N column sums of q (int32).
 * Accumulation is fp32 FMA in k order for fp32 / bf16 / int8, exact int32 for WT_Q8.
 * Built with -O3 -march=native by wenet_moe/layers/cpu_kernel.py; GCC vector
 * extensions map vec16 onto AVX-512, AVX2 or NEON registers.
 *
 * Threads: with -fopenmp the work items (an expert's rows, or a block of them) are
 * shared by `threads` OpenMP threads, largest first. In a PyTorch process the
 * library binds to the libgomp torch already loaded (same soname), so these regions
 * run on torch's own OpenMP thread pool instead of competing with it.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float vec16 __attribute__((vector_size(64)));
typedef int32_t ivec16 __attribute__((vector_size(64)));
typedef uint16_t u16vec16 __attribute__((vector_size(32)));
typedef int8_t i8vec16 __attribute__((vector_size(16)));

enum { WT_F32 = 0, WT_BF16 = 1, WT_I8 = 2, WT_Q8 = 3 };
/* bytes of one weight element of type wt */
static inline int wt_size(const int wt) { return wt == WT_F32 ? 4 : wt == WT_BF16 ? 2 : 1; }

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_SILU = 2 };
/* flag of wm_moe_forward's `act` (moe_conf.expert_precision bf16a): the experts' inputs,
 * hidden units (after the activation) and outputs are rounded to bfloat16, as a bf16
 * GEMM (oneDNN on AMX / AVX512-BF16) computes them: bf16 operands, fp32 sums, bf16 results */
#define ACT_BF16 8

/* n floats rounded to bfloat16 in place (to nearest, ties to even, as torch's
 * float -> bfloat16; NaN stays NaN): the low 16 bits cleared */
static void round_bf16(float *p, const int64_t n) {
    uint32_t *u = (uint32_t *)p;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t v = u[i];
        u[i] = (v & 0x7fffffffu) > 0x7f800000u ? (v | 0x00400000u) & 0xffff0000u
                                                 : (v + 0x7fffu + ((v >> 16) & 1u)) & 0xffff0000u;
    }
}

/* 16-float vectors are two registers on AVX2 and four on SSE / NEON: a helper GCC does
 * not inline passes them through memory, so the helpers are always inlined */
#define INLINE inline __attribute__((always_inline))
#define MAX_TILE 12
/* rows of one tile: AVX-512 keeps 12 rows x 32 columns of accumulators in its 32 zmm
 * registers (`tile`); with 16 registers of 8 floats (AVX2) or fewer, 12 x 32 would
 * spill in the k loop (a -march=haswell build ran 20x slower than dense at 16
 * frames), so other targets run `tile_narrow`: 6 rows x 16 columns (12 ymm). */
#if defined(__AVX512F__)
#define TILE_ROWS 12
#else
#define TILE_ROWS 6
#endif

static INLINE vec16 load16(const float *p) { vec16 v; memcpy(&v, p, sizeof v); return v; }
static INLINE void store16(float *p, vec16 v) { memcpy(p, &v, sizeof v); }

/* 16 consecutive weights of type wt at p (element offset already applied), as fp32.
 * x86 gets the widening moves by intrinsics: GCC 12 turns the generic int8 -> int32
 * __builtin_convertvector into scalar code, and bf16 into 5 instructions, not 2. */
static inline __attribute__((always_inline)) vec16 loadw(const char *p, const int wt) {
#if defined(__AVX512F__)
    if (wt == WT_BF16)      /* bf16 -> fp32: the 16 bits become the float's top half */
        return (vec16)_mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    if (wt == WT_I8)
        return (vec16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    if (wt == WT_BF16 || wt == WT_I8) {
        union { vec16 v; __m256 h[2]; } u;
        for (int i = 0; i < 2; i++) {
            if (wt == WT_BF16)
                u.h[i] = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 16 * i))), 16));
            else
                u.h[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * i))));
        }
        return u.v;
    }
#endif
    if (wt == WT_BF16) {            /* generic: bf16 -> fp32 by a shift */
        u16vec16 u;
        memcpy(&u, p, sizeof u);
        const ivec16 bits = __builtin_convertvector(u, ivec16) << 16;
        vec16 v;
        memcpy(&v, &bits, sizeof v);
        return v;
    }
    if (wt == WT_I8) {
        i8vec16 q;
        memcpy(&q, p, sizeof q);
        return __builtin_convertvector(__builtin_convertvector(q, ivec16), vec16);
    }
    return load16((const float *)p);
}

typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
static INLINE vec8 load8(const float *p) { vec8 v; memcpy(&v, p, sizeof v); return v; }
static INLINE void store8(float *p, vec8 v) { memcpy(p, &v, sizeof v); }

/* 8 consecutive weights of type wt at p, as fp32 (the narrow tile's half panel row) */
static inline __attribute__((always_inline)) vec8 loadw8(const char *p, const int wt) {
#if defined(__AVX2__)
    if (wt == WT_BF16)
        return (vec8)_mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    if (wt == WT_I8)
        return (vec8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#endif
    if (wt == WT_BF16) {
        uint16_t u[8];
        int32_t bits[8];
        memcpy(u, p, sizeof u);
        for (int i = 0; i < 8; i++) bits[i] = (int32_t)((uint32_t)u[i] << 16);
        vec8 v;
        memcpy(&v, bits, sizeof v);
        return v;
    }
    if (wt == WT_I8) {
        vec8 v;
        for (int i = 0; i < 8; i++) v[i] = (float)((const int8_t *)p)[i];
        return v;
    }
    return load8((const float *)p);
}

static INLINE vec16 splat(float v) { return (vec16){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}; }
/* For one vector type VEC (IVEC: its int32 lanes), W its lanes: select##W (lanes of a
 * where mask is all ones, else b; vector casts are bit reinterpretations), exp##W
 * (exp(x) to ~2 ulp, Cephes' expf: 2^n * polynomial on [-ln2/2, ln2/2]; x clamped to
 * [-87, 88], so the result stays finite and normal) and activate##W (ReLU, SiLU or
 * none). Made for 16 floats (AVX-512 registers) and 8 (AVX2 registers): GCC
 * scalarizes comparisons of vectors wider than the target's registers (a compare, a
 * branch and an insert per lane; the AVX2 build's SiLU epilogue took 9x the AVX-512
 * one's time), so builds without AVX-512 compute in 8-float halves. */
#define DEFINE_VECTOR_MATH(W, VEC, IVEC)                                                     \
static INLINE VEC select##W(IVEC mask, VEC a, VEC b) {                                        \
    return (VEC)(((IVEC)a & mask) | ((IVEC)b & ~mask));                                       \
}                                                                                             \
static INLINE VEC exp##W(VEC x) {                                                             \
    const VEC z = {0};                                                                        \
    x = select##W(x < z - 87.0f, z - 87.0f, x);                                               \
    x = select##W(x > z + 88.0f, z + 88.0f, x);                                               \
    const VEC t = x * 1.44269504088896341f + 0.5f;                                            \
    IVEC n = __builtin_convertvector(t, IVEC);                /* truncation ... */            \
    n += (IVEC)(__builtin_convertvector(n, VEC) > t);         /* ... to floor (-1 where true) */ \
    const VEC fn = __builtin_convertvector(n, VEC);                                           \
    const VEC r = x - fn * 0.693359375f + fn * 2.12194440e-4f;                                \
    VEC p = z + 1.9875691500e-4f;                                                             \
    p = p * r + 1.3981999507e-3f;                                                             \
    p = p * r + 8.3334519073e-3f;                                                             \
    p = p * r + 4.1665795894e-2f;                                                             \
    p = p * r + 1.6666665459e-1f;                                                             \
    p = p * r + 5.0000001201e-1f;                                                             \
    p = p * r * r + r + 1.0f;                                                                 \
    const IVEC scale = (n + 127) << 23;                                                       \
    VEC two_n;                                                                                \
    memcpy(&two_n, &scale, sizeof two_n);                                                     \
    return p * two_n;                                                                         \
}                                                                                             \
static INLINE VEC activate##W(VEC v, const int act) {                                         \
    const VEC z = {0};                                                                        \
    if (act == ACT_RELU) return select##W(v < z, z, v);             /* NaN stays NaN */       \
    if (act == ACT_SILU)   /* below -87, x * sigmoid(x) underflows (|.| < 1e-36): 0 */        \
        return select##W(v < z - 87.0f, z, v / (1.0f + exp##W(-v)));                          \
    return v;                                                                                 \
}
DEFINE_VECTOR_MATH(16, vec16, ivec16)
DEFINE_VECTOR_MATH(8, vec8, ivec8)

/* activate16, in 8-float halves without AVX-512 (see DEFINE_VECTOR_MATH) */
static INLINE vec16 activate(vec16 v, const int act) {
#if defined(__AVX512F__)
    return activate16(v, act);
#else
    vec8 h[2];
    memcpy(h, &v, sizeof v);
    h[0] = activate8(h[0], act);
    h[1] = activate8(h[1], act);
    memcpy(&v, h, sizeof v);
    return v;
#endif
}

/* rows (<= MAX_TILE, a compile-time constant after inlining) rows of y = act(x W + b);
 * x is the tile transposed, xt[k * rows + m] (one contiguous stream of broadcasts:
 * rows 4 KB apart would share one L1 set and evict each other); w packed as above with
 * elements of type wt (a compile-time constant too); scale (N floats) only for WT_I8 */
static inline __attribute__((always_inline)) void tile(
        const float *xt, const int rows, const int K, const int N, const char *w,
        const float *scale, const float *b, float *y, int64_t ldy, const int act, const int wt) {
    const int blocks = N / 16;
    const int64_t row = 16 * wt_size(wt);           /* bytes of one panel row */
    const int64_t panel = (int64_t)K * row;         /* bytes of one K x 16 panel */
    const vec16 zero = splat(0.0f);
    int j = 0;
    for (; j + 2 <= blocks; j += 2) {
        const char *p0 = w + j * panel, *p1 = p0 + panel;
        const char *next = p1 + panel;   /* the next pair (or what follows) */
        const vec16 b0 = load16(b + 16 * j), b1 = load16(b + 16 * j + 16);
        vec16 a0[MAX_TILE], a1[MAX_TILE];
        /* int8: sum x q first, then * scale + b; other types start from the bias */
        for (int m = 0; m < rows; m++) { a0[m] = wt == WT_I8 ? zero : b0; a1[m] = wt == WT_I8 ? zero : b1; }
        for (int k = 0; k < K; k++) {
            /* prefetcht2 (into L2) of the next two pairs, 2 * row bytes of each per k:
             * two cache lines for fp32, one for bf16, one every other k for int8 (two
             * pairs ahead rather than one: -4 to -8 % at 16-256 frames on Zen 4) */
            if (wt != WT_I8 || (k & 1) == 0) {
                __builtin_prefetch(next + 2 * row * k, 0, 1);
                __builtin_prefetch(next + 2 * panel + 2 * row * k, 0, 1);
            }
            if (wt == WT_F32) {
                __builtin_prefetch(next + 2 * row * k + 64, 0, 1);
                __builtin_prefetch(next + 2 * panel + 2 * row * k + 64, 0, 1);
            }
            const vec16 w0 = loadw(p0 + row * k, wt), w1 = loadw(p1 + row * k, wt);
            for (int m = 0; m < rows; m++) {
                const float xv = xt[k * rows + m];
                a0[m] += xv * w0;
                a1[m] += xv * w1;
            }
        }
        if (wt == WT_I8) {
            const vec16 s0 = load16(scale + 16 * j), s1 = load16(scale + 16 * j + 16);
            for (int m = 0; m < rows; m++) { a0[m] = a0[m] * s0 + b0; a1[m] = a1[m] * s1 + b1; }
        }
        for (int m = 0; m < rows; m++) {
            store16(y + m * ldy + 16 * j, activate(a0[m], act));
            store16(y + m * ldy + 16 * j + 16, activate(a1[m], act));
        }
    }
    if (j < blocks) {   /* odd number of column blocks: the last one alone */
        const char *p0 = w + j * panel;
        const vec16 b0 = load16(b + 16 * j);
        vec16 a0[MAX_TILE];
        for (int m = 0; m < rows; m++) a0[m] = wt == WT_I8 ? zero : b0;
        for (int k = 0; k < K; k++) {
            if (wt == WT_F32 || (k & (wt == WT_BF16 ? 1 : 3)) == 0)
                __builtin_prefetch(p0 + panel + row * k, 0, 1);
            const vec16 w0 = loadw(p0 + row * k, wt);
            for (int m = 0; m < rows; m++) a0[m] += xt[k * rows + m] * w0;
        }
        if (wt == WT_I8) {
            const vec16 s0 = load16(scale + 16 * j);
            for (int m = 0; m < rows; m++) a0[m] = a0[m] * s0 + b0;
        }
        for (int m = 0; m < rows; m++) store16(y + m * ldy + 16 * j, activate(a0[m], act));
    }
}

/* `tile` for targets without AVX-512 (rows <= 6): one 16-column panel at a time as two
 * 8-float halves, 2 x rows accumulators; the same fp32 sums in k order as `tile`, so
 * both give the same results. The epilogue works on the two halves (activate8). */
static inline __attribute__((always_inline)) void tile_narrow(
        const float *xt, const int rows, const int K, const int N, const char *w,
        const float *scale, const float *b, float *y, int64_t ldy, const int act, const int wt) {
    const int blocks = N / 16;
    const int64_t row = 16 * wt_size(wt);
    const int64_t panel = (int64_t)K * row;
    const int64_t half = row / 2;
    /* prefetch one cache line per 64 bytes of panel of each of the next two panels:
     * every k (fp32), every 2nd (bf16), every 4th (int8) (two panels ahead rather than
     * one: -7 % at 16 frames, -19 % at 1 on Zen 4 with a -march=haswell build) */
    const int every = wt == WT_F32 ? 1 : wt == WT_BF16 ? 2 : 4;
    for (int j = 0; j < blocks; j++) {
        const char *p0 = w + j * panel;
        const char *next = p0 + panel;
        vec8 lo[TILE_ROWS], hi[TILE_ROWS];
        const vec8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
        const vec8 blo = wt == WT_I8 ? zero : load8(b + 16 * j);
        const vec8 bhi = wt == WT_I8 ? zero : load8(b + 16 * j + 8);
        for (int m = 0; m < rows; m++) { lo[m] = blo; hi[m] = bhi; }
        for (int k = 0; k < K; k++) {
            if ((k & (every - 1)) == 0) {
                __builtin_prefetch(next + row * k, 0, 1);
                __builtin_prefetch(next + panel + row * k, 0, 1);
            }
            const vec8 w0 = loadw8(p0 + row * k, wt), w1 = loadw8(p0 + row * k + half, wt);
            for (int m = 0; m < rows; m++) {
                const float xv = xt[k * rows + m];
                lo[m] += xv * w0;
                hi[m] += xv * w1;
            }
        }
        for (int m = 0; m < rows; m++) {
            vec8 v0 = lo[m], v1 = hi[m];
            if (wt == WT_I8) {
                v0 = v0 * load8(scale + 16 * j) + load8(b + 16 * j);
                v1 = v1 * load8(scale + 16 * j + 8) + load8(b + 16 * j + 8);
            }
            store8(y + m * ldy + 16 * j, activate8(v0, act));
            store8(y + m * ldy + 16 * j + 8, activate8(v1, act));
        }
    }
}


/* ---- WT_Q8: int8 x int8 -> int32 dot products ------------------------------------ */
/* 64 weight bytes p (16 columns x 4 k) dotted with the 4 uint8 activations packed in
 * xb (byte t: k = 4 q + t), added to the 16 int32 lanes of acc */
static inline __attribute__((always_inline)) ivec16 dot4(ivec16 acc, const uint32_t xb, const char *p) {
#if defined(__AVX512VNNI__)
    return (ivec16)_mm512_dpbusd_epi32((__m512i)acc, _mm512_set1_epi32((int)xb),
                                       _mm512_loadu_si512((const void *)p));
#elif defined(__AVXVNNI__)
    union { ivec16 v; __m256i h[2]; } u = {.v = acc};
    const __m256i xv = _mm256_set1_epi32((int)xb);
    u.h[0] = _mm256_dpbusd_avx_epi32(u.h[0], xv, _mm256_loadu_si256((const __m256i *)p));
    u.h[1] = _mm256_dpbusd_avx_epi32(u.h[1], xv, _mm256_loadu_si256((const __m256i *)(p + 32)));
    return u.v;
#else
    ivec16 words;       /* lane c holds the 4 weight bytes of column c */
    memcpy(&words, p, sizeof words);
    for (int t = 0; t < 4; t++)   /* byte t, sign-extended, times activation byte t */
        acc += ((words << (24 - 8 * t)) >> 24) * (int32_t)((xb >> (8 * t)) & 255u);
    return acc;
#endif
}

/* how the build multiplies w8a8 rows: 2 VNNI (`vpdpbusd`, 64 products per
 * instruction), 1 AVX2 `vpmaddwd` (16), 0 the generic emulation by shifts */
int wm_int8_dot_native(void) {
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

static INLINE ivec16 loadi16(const int32_t *p) { ivec16 v; memcpy(&v, p, sizeof v); return v; }

/* AVX2 without VNNI (AMD Zen 1-3, Intel before Ice Lake / Alder Lake): the rows are
 * kept as int16 (x_q, no +128) and `vpmaddwd` multiplies pairs of int16 into int32 (16
 * products per instruction, exact), `tile_q8_madd`; the same integer sums as dot4. */
#if defined(__AVX2__) && !defined(__AVX512VNNI__) && !defined(__AVXVNNI__)
#define Q8_MADD 1
#else
#define Q8_MADD 0
#endif

/* WT_Q8 panels one tile visits at a time: two on AVX-512 (rows x 2 accumulators of 32
 * zmm), one elsewhere (an ivec16 is 2 ymm: 6 rows x 2 = 12 of 16 registers) */
#if defined(__AVX512F__)
#define Q8_PANELS 2
#else
#define Q8_PANELS 1
#endif

/* rows (<= TILE_ROWS) rows of y = act(dequant(xq W) + b) for WT_Q8: xq holds the tile's
 * quantized rows as uint32 groups xq[q * rows + m] (4 k each), sx their row scales;
 * aux the column scales (N floats) then the column sums of q (N int32) */
static inline __attribute__((always_inline)) void tile_q8(
        const uint32_t *xq, const float *sx, const int rows, const int K, const int N,
        const char *w, const float *aux, const float *b, float *y, int64_t ldy, const int act) {
    const int blocks = N / 16, quads = K / 4;
    const int64_t panel = (int64_t)K * 16;          /* bytes of one K x 16 panel */
    const int32_t *wsum = (const int32_t *)(aux + N);
    const ivec16 izero = {0};
    for (int j = 0; j < blocks; j += Q8_PANELS) {
        const int pair = Q8_PANELS == 2 && j + 1 < blocks;
        const char *p0 = w + j * panel, *p1 = p0 + panel;
        const char *next = w + (j + (pair ? 2 : 1)) * panel;
        ivec16 a0[TILE_ROWS], a1[TILE_ROWS];
        for (int m = 0; m < rows; m++) { a0[m] = izero; a1[m] = izero; }
        if (pair) {
            for (int q = 0; q < quads; q++) {
                __builtin_prefetch(next + 128 * q, 0, 1);      /* the next pair: 2 lines */
                __builtin_prefetch(next + 128 * q + 64, 0, 1);
                for (int m = 0; m < rows; m++) {
                    a0[m] = dot4(a0[m], xq[q * rows + m], p0 + 64 * q);
                    a1[m] = dot4(a1[m], xq[q * rows + m], p1 + 64 * q);
                }
            }
        } else {
            for (int q = 0; q < quads; q++) {
                __builtin_prefetch(next + 64 * q, 0, 1);
                for (int m = 0; m < rows; m++) a0[m] = dot4(a0[m], xq[q * rows + m], p0 + 64 * q);
            }
        }
        for (int h = 0; h < 1 + pair; h++) {
            const int c = 16 * (j + h);
            const vec16 s = load16(aux + c), bias = load16(b + c);
            const ivec16 shift = loadi16(wsum + c) * 128;     /* the +128 of the uint8 rows */
            for (int m = 0; m < rows; m++) {
                const vec16 v = __builtin_convertvector((h ? a1[m] : a0[m]) - shift, vec16);
                store16(y + m * ldy + c, activate(v * (splat(sx[m]) * s) + bias, act));
            }
        }
    }
}

#if Q8_MADD
/* tile_q8 for Q8_MADD builds: xq holds 4 int16 x_q per group (xq[q * rows + m], 8
 * bytes). Each 16-column panel is done as two 8-column halves (rows x 2 accumulators
 * of 8 lanes, lane = (column, k pair); the second half reads the panel again from L1
 * / L2); the lane pairs are added once at the end. rows <= 6 (12 of 16 ymm). */
static inline __attribute__((always_inline)) void tile_q8_madd(
        const uint64_t *xq, const float *sx, const int rows, const int K, const int N,
        const char *w, const float *aux, const float *b, float *y, int64_t ldy, const int act) {
    const int blocks = N / 16, quads = K / 4;
    const int64_t panel = (int64_t)K * 16;
    int32_t sums[TILE_ROWS][16];
    for (int j = 0; j < blocks; j++) {
        const char *p0 = w + j * panel;
        for (int h = 0; h < 2; h++) {       /* columns 8 h .. 8 h + 7 of the panel */
            __m256i lo[TILE_ROWS], hi[TILE_ROWS];
            for (int m = 0; m < rows; m++) { lo[m] = _mm256_setzero_si256(); hi[m] = _mm256_setzero_si256(); }
            for (int q = 0; q < quads; q++) {
                const char *g = p0 + 64 * q + 32 * h;
                if (h == 0 && (q & 1) == 0) __builtin_prefetch(p0 + panel + 64 * q, 0, 1);
                /* columns 0-3 and 4-7 of the half, 4 k each, widened to int16 */
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)g));
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(g + 16)));
                for (int m = 0; m < rows; m++) {
                    const __m256i xv = _mm256_set1_epi64x((long long)xq[q * rows + m]);
                    lo[m] = _mm256_add_epi32(lo[m], _mm256_madd_epi16(w0, xv));
                    hi[m] = _mm256_add_epi32(hi[m], _mm256_madd_epi16(w1, xv));
                }
            }
            for (int m = 0; m < rows; m++) {
                /* lanes (c, k pair): hadd gives columns 0 1 4 5 | 2 3 6 7 */
                const __m256i c = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo[m], hi[m]), 0xD8);
                _mm256_storeu_si256((__m256i *)(sums[m] + 8 * h), c);
            }
        }
        const int c = 16 * j;
        const vec16 s = load16(aux + c), bias = load16(b + c);
        for (int m = 0; m < rows; m++) {
            const vec16 v = __builtin_convertvector(loadi16(sums[m]), vec16);
            store16(y + m * ldy + c, activate(v * (splat(sx[m]) * s) + bias, act));
        }
    }
}
#endif

/* quantize rows x[0:rows] (ldx apart, K each, K % 16 == 0) into xq (uint32 groups,
 * xq[q * rows + m] = bytes x_q[m][4q + t] + 128; Q8_MADD builds: uint64 groups of the
 * 4 int16 x_q[m][4q + t]) and their scales sx[m]; an all-zero
 * row gets scale 0 (its products vanish, y = b). Rounding is to nearest even by the
 * 1.5 * 2^23 trick (exact for |v| <= 127; -ffp-contract does not reassociate it). */
#if defined(__AVX512F__)     /* lanes quantized at a time: a register (DEFINE_VECTOR_MATH) */
#define QW 16
typedef vec16 qvec;
typedef ivec16 iqvec;
#define qselect select16
#else
#define QW 8
typedef vec8 qvec;
typedef ivec8 iqvec;
#define qselect select8
#endif
static void quantize_rows(const float *x, int64_t ldx, int rows, int K, void *xq, float *sx) {
    const qvec z = {0};
    const iqvec magnitude = (iqvec){0} + 0x7fffffff;
    for (int m = 0; m < rows; m++) {
        const float *r = x + m * ldx;
        qvec vmax = z;
        for (int k = 0; k < K; k += QW) {
            qvec a;
            memcpy(&a, r + k, sizeof a);
            a = (qvec)((iqvec)a & magnitude);
            vmax = qselect(a > vmax, a, vmax);
        }
        float amax = 0.0f;
        for (int c = 0; c < QW; c++) amax = vmax[c] > amax ? vmax[c] : amax;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        sx[m] = amax / 127.0f;
        for (int k = 0; k < K; k += QW) {
            qvec v;
            memcpy(&v, r + k, sizeof v);
            v = v * inv;
            v = (v + 12582912.0f) - 12582912.0f;
            v = qselect(v > z + 127.0f, z + 127.0f, v);
            v = qselect(v < z - 127.0f, z - 127.0f, v);
            const iqvec iv = __builtin_convertvector(v, iqvec);
#if Q8_MADD
            for (int i = 0; i < QW / 4; i++) {
                uint64_t g = 0;
                for (int t = 0; t < 4; t++) g |= (uint64_t)(uint16_t)(int16_t)iv[4 * i + t] << (16 * t);
                ((uint64_t *)xq)[(int64_t)(k / 4 + i) * rows + m] = g;
            }
#else
            const iqvec u = iv + 128;
            uint32_t g[QW / 4];
#if defined(__AVX512F__)
            _mm_storeu_si128((__m128i *)g, _mm512_cvtepi32_epi8((__m512i)u));
#else
            for (int i = 0; i < QW / 4; i++)
                g[i] = (uint32_t)u[4 * i] | (uint32_t)u[4 * i + 1] << 8 | (uint32_t)u[4 * i + 2] << 16
                       | (uint32_t)u[4 * i + 3] << 24;
#endif
            for (int i = 0; i < QW / 4; i++) ((uint32_t *)xq)[(int64_t)(k / 4 + i) * rows + m] = g[i];
#endif
        }
    }
}

#if TILE_ROWS == 12
#define TILE_CASE(R, WT) case R: tile(xt, R, K, N, w, scale, b, y, ldy, act, WT); break;
#define TILE_CASES(WT) switch (r) { \
    TILE_CASE(1, WT) TILE_CASE(2, WT) TILE_CASE(3, WT) TILE_CASE(4, WT) TILE_CASE(5, WT) \
    TILE_CASE(6, WT) TILE_CASE(7, WT) TILE_CASE(8, WT) TILE_CASE(9, WT) TILE_CASE(10, WT) \
    TILE_CASE(11, WT) TILE_CASE(12, WT) default: break; }
#define Q8_CASES switch (r) { \
    Q8_CASE(1) Q8_CASE(2) Q8_CASE(3) Q8_CASE(4) Q8_CASE(5) Q8_CASE(6) Q8_CASE(7) Q8_CASE(8) \
    Q8_CASE(9) Q8_CASE(10) Q8_CASE(11) Q8_CASE(12) default: break; }
#else
#define TILE_CASE(R, WT) case R: tile_narrow(xt, R, K, N, w, scale, b, y, ldy, act, WT); break;
#define TILE_CASES(WT) switch (r) { \
    TILE_CASE(1, WT) TILE_CASE(2, WT) TILE_CASE(3, WT) TILE_CASE(4, WT) TILE_CASE(5, WT) \
    TILE_CASE(6, WT) default: break; }
#define Q8_CASES switch (r) { \
    Q8_CASE(1) Q8_CASE(2) Q8_CASE(3) Q8_CASE(4) Q8_CASE(5) Q8_CASE(6) default: break; }
#endif
#if Q8_MADD
#define Q8_CASE(R) case R: tile_q8_madd((const uint64_t *)xq, sx, R, K, N, w, scale, b, y, ldy, act); break;
#else
#define Q8_CASE(R) case R: tile_q8((const uint32_t *)xq, sx, R, K, N, w, scale, b, y, ldy, act); break;
#endif

#if defined(__AVX512F__)
/* A 16 x 16 block transposed in registers: four rounds of two-source permutes
 * (`vpermt2ps`, in GCC and clang alike), round s swapping s x s sub-blocks between rows
 * i and i + s; lane l of a round's index picks source a (0-15) or b (16-31) */
#define TRANSPOSE_ROUND(S)                                                                   \
    do {                                                                                     \
        ivec16 pick_a, pick_b;                                                               \
        for (int l = 0; l < 16; l++) {                                                       \
            pick_a[l] = (l & (S)) == 0 ? l : 16 + l - (S);                                   \
            pick_b[l] = (l & (S)) == 0 ? l + (S) : 16 + l;                                   \
        }                                                                                    \
        const __m512i ia = (__m512i)pick_a, ib = (__m512i)pick_b;                            \
        for (int i = 0; i < 16; i++) {                                                       \
            if (i & (S)) continue;                                                           \
            const __m512 a = (__m512)v[i], b = (__m512)v[i + (S)];                           \
            v[i] = (vec16)_mm512_permutex2var_ps(a, ia, b);                                  \
            v[i + (S)] = (vec16)_mm512_permutex2var_ps(a, ib, b);                            \
        }                                                                                    \
    } while (0)

static INLINE void transpose16(vec16 v[16]) {
    TRANSPOSE_ROUND(8);
    TRANSPOSE_ROUND(4);
    TRANSPOSE_ROUND(2);
    TRANSPOSE_ROUND(1);
}
#endif

/* xt[k * rows + m] = x[m * ldx + k] for m < rows (<= 16), k < K: on AVX-512 from 4 rows
 * on, 16 k at a time through `transpose16` (the element-wise loop was ~7 % of a
 * 1024-frame call there: 2 x rows x K scalar loads and stores per tile). Each
 * transposed row of 16 is stored whole at xt + k * rows; its lanes past `rows` land on
 * the next k's entries, which the next store (or the loop below) overwrites: xt needs
 * 16 floats of room past rows x K. */
static void transpose_rows(const float *x, const int64_t ldx, const int rows, const int K, float *xt) {
    int k0 = 0;
#if defined(__AVX512F__)
    /* AVX-512 only: the same transpose in 16-lane generic shuffles, split into narrower
     * ones on AVX2, made a layer call 18 % slower there at 256-1024 frames (where the loop
     * below is at MKL's rate); 1-3 rows: the loop below is cheaper */
    for (; rows > 3 && k0 + 16 <= K; k0 += 16) {
        vec16 v[16];
        for (int m = 0; m < 16; m++) v[m] = m < rows ? load16(x + m * ldx + k0) : splat(0.0f);
        transpose16(v);
        for (int j = 0; j < 16; j++) store16(xt + (int64_t)(k0 + j) * rows, v[j]);
    }
#endif
    for (int m = 0; m < rows; m++)
        for (int k = k0; k < K; k++) xt[(int64_t)k * rows + m] = x[m * ldx + k];
}

/* y[0:rows] = act(x[0:rows] W + b), in the fewest tiles of up to MAX_TILE rows, of
 * balanced sizes (16 rows = 8 + 8, not 12 + 4: a tile costs at least one pass over W).
 * W has elements of type wt (scale: N floats for WT_I8, 2N words for WT_Q8, else unused). */
static void linear_rows(const float *x, int64_t ldx, int64_t rows, int K, int N, const char *w,
                        const float *scale, const float *b, float *y, int64_t ldy, int act, int wt,
                        float *xt) {
    while (rows > 0) {
        const int64_t tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
        const int r = (int)((rows + tiles - 1) / tiles);
        if (wt == WT_Q8) {     /* xt's room (MAX_TILE * K floats) holds the quantized rows */
            void *xq = xt;
            float sx[TILE_ROWS];
            quantize_rows(x, ldx, r, K, xq, sx);
            Q8_CASES
        } else {
            transpose_rows(x, ldx, r, K, xt);
            if (wt == WT_BF16) {
                TILE_CASES(WT_BF16)
            } else if (wt == WT_I8) {
                TILE_CASES(WT_I8)
            } else {
                TILE_CASES(WT_F32)
            }
        }
        x += r * ldx;
        y += r * ldy;
        rows -= r;
    }
}

int wm_abi_version(void) { return 12; }

/* the widest vector unit this build targets: 2 AVX-512, 1 AVX2 (x86), 0 other (the
 * generic vector code: NEON, or an x86-64 CPU without AVX2, where it is slow) */
int wm_vector_isa(void) {
    int isa = 0;
#if defined(__AVX2__)
    isa = 1;
#endif
#if defined(__AVX512F__)
    isa = 2;
#endif
    return isa;
}

/* 1 when wt is a weight type of this file and the K x N matrices suit it (WT_Q8 needs
 * K and N multiples of 16) */
static int known_type(const int wt, const int64_t K, const int64_t N) {
    if (wt == WT_Q8) return K % 16 == 0 && N % 16 == 0;
    return wt == WT_F32 || wt == WT_BF16 || wt == WT_I8;
}

/* the column scales of expert e (N columns) in `scale`: N floats per expert for WT_I8,
 * 2N words (scales, column sums) for WT_Q8; NULL for the other types */
static const float *expert_scale(const float *scale, const int64_t e, const int64_t N, const int wt) {
    return scale == NULL ? NULL : scale + e * N * (wt == WT_Q8 ? 2 : 1);
}

/* 1 when built with OpenMP (the threads arguments below are honoured), else 0 */
int wm_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Work items of the expert loop: (expert, first row, rows), largest first. An expert
 * with many rows is split into blocks of >= 2 tiles so that `threads` threads share
 * it (each block streams the weights once more: only worth it when compute-bound);
 * with few rows an expert stays one item (one pass over its weights). */
typedef struct { int64_t expert, first, rows; } item_t;

static int cmp_items(const void *a, const void *b) {
    const int64_t ra = ((const item_t *)a)->rows, rb = ((const item_t *)b)->rows;
    return (ra < rb) - (ra > rb);
}

static int64_t make_items(const int64_t *start, const int64_t *count, int64_t n, int threads,
                          item_t *items) {
    int64_t total = 0, n_items = 0;
    for (int64_t e = 0; e < n; e++) total += count[e];
    /* blocks of at least 2 tiles, and about 4 items per thread over the whole call */
    int64_t block = total / (4 * (int64_t)(threads > 0 ? threads : 1));
    if (block < 2 * TILE_ROWS) block = 2 * TILE_ROWS;
    block = (block + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    for (int64_t e = 0; e < n; e++) {
        for (int64_t r = 0; r < count[e]; r += block) {
            const int64_t rows = count[e] - r < block ? count[e] - r : block;
            /* a tail shorter than a tile joins the previous block */
            if (r > 0 && rows < TILE_ROWS) { items[n_items - 1].rows += rows; break; }
            items[n_items].expert = e;
            items[n_items].first = start[e] + r;
            items[n_items].rows = rows;
            n_items++;
        }
    }
    if (threads > 1) qsort(items, (size_t)n_items, sizeof(item_t), cmp_items);
    return n_items;
}

/* per-thread buffers kept between calls, freed when the thread ends: slot BUF_TILE a
 * worker's tile buffer (OpenMP's or the pool's threads), BUF_WORK the custom op's work
 * space in the calling thread */
enum { BUF_TILE = 0, BUF_WORK = 1, N_BUFFERS = 2 };
static pthread_key_t buffer_key[N_BUFFERS];
static pthread_once_t buffer_keys_once = PTHREAD_ONCE_INIT;
static void make_buffer_keys(void) {
    for (int i = 0; i < N_BUFFERS; i++) pthread_key_create(&buffer_key[i], free);
}

/* this thread's buffer `slot` of at least `bytes` (64-byte aligned), NULL when out of memory */
static void *thread_buffer(const int slot, const size_t bytes) {
    pthread_once(&buffer_keys_once, make_buffer_keys);
    char *buf = pthread_getspecific(buffer_key[slot]);
    /* its size is kept in the first 64 bytes */
    if (buf != NULL && *(size_t *)buf >= bytes) return buf + 64;
    free(buf);
    buf = aligned_alloc(64, (bytes + 127) / 64 * 64);
    if (buf != NULL) *(size_t *)buf = bytes;
    pthread_setspecific(buffer_key[slot], buf);
    return buf == NULL ? NULL : buf + 64;
}

/* For each segment s: rows [start[s], start[s] + count[s]) of x (ldx floats apart) go
 * through expert expert[s]: y rows = act(x rows W_e + b_e), W_e = w_packed + e*K*N
 * elements of type wt (packed as above; WT_I8: times scale + e*N per column),
 * b_e = bias + e*N; y rows are ldy floats apart; act is ACT_NONE, ACT_RELU or ACT_SILU
 * (x * sigmoid(x)). Returns 0, -2 when out of memory, -3 for an unknown wt. */
int wm_segment_linear(const float *x, int64_t ldx, const int64_t *start, const int64_t *count,
                      const int64_t *expert, int64_t n_segments, int K, int N,
                      const void *w_packed, const float *scale, int wt, const float *bias, float *y,
                      int64_t ldy, int act, int threads) {
    if (!known_type(wt, K, N)) return -3;
    /* work items as in wm_moe_forward; their "expert" field is the segment number */
    int64_t max_items = 1;
    for (int64_t s = 0; s < n_segments; s++) max_items += count[s] / MAX_TILE + 1;
    item_t *items = malloc(sizeof(item_t) * (size_t)max_items);
    if (items == NULL) return -2;
    const int64_t n_items = make_items(start, count, n_segments, threads, items);
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1 && n_items > 1)
    for (int64_t i = 0; i < n_items; i++) {
        float *xt = thread_buffer(BUF_TILE, sizeof(float) * (MAX_TILE * (size_t)K + 16));
        if (xt == NULL) {
#pragma omp atomic write
            status = -2;
        } else {
            const int64_t s = items[i].expert, e = expert[s];
            const int64_t first = items[i].first;
            linear_rows(x + first * ldx, ldx, items[i].rows, K, N,
                        (const char *)w_packed + e * (int64_t)K * N * wt_size(wt),
                        expert_scale(scale, e, N, wt), bias + e * (int64_t)N,
                        y + first * ldy, ldy, act, wt, xt);
        }
    }
    free(items);
    return status;
}

/* One call's expert loop: work item i runs an expert's two linears on its rows. */
typedef struct {
    const item_t *items;
    int64_t n_items;
    int dim, hidden, wt, act, bf16_rows;
    const void *w1, *w2;
    const float *scale1, *b1, *scale2, *b2;
    float *x_sorted, *h, *y_sorted;
    int failed;     /* set (atomically) when a thread had no tile buffer */
} expert_call_t;

/* floats of a thread's tile buffer (xt of linear_rows) for this call */
static size_t tile_floats(const expert_call_t *c) {
    return MAX_TILE * (size_t)(c->dim > c->hidden ? c->dim : c->hidden) + 16;
}

static void expert_item(const expert_call_t *c, const int64_t i, float *xt) {
    const int64_t e = c->items[i].expert, s = c->items[i].first, rows = c->items[i].rows;
    const int64_t bytes = (int64_t)c->dim * c->hidden * wt_size(c->wt);   /* one expert's matrix */
    linear_rows(c->x_sorted + s * c->dim, c->dim, rows, c->dim, c->hidden, (const char *)c->w1 + e * bytes,
                expert_scale(c->scale1, e, c->hidden, c->wt), c->b1 + e * c->hidden, c->h + s * c->hidden,
                c->hidden, c->act, c->wt, xt);
    if (c->bf16_rows) round_bf16(c->h + s * c->hidden, rows * c->hidden);
    linear_rows(c->h + s * c->hidden, c->hidden, rows, c->hidden, c->dim, (const char *)c->w2 + e * bytes,
                expert_scale(c->scale2, e, c->dim, c->wt), c->b2 + e * c->dim, c->y_sorted + s * c->dim,
                c->dim, ACT_NONE, c->wt, xt);
    if (c->bf16_rows) round_bf16(c->y_sorted + s * c->dim, rows * c->dim);
}

/* Another thread pool than OpenMP's (ONNX Runtime's, for the custom op below):
 * run(state, fn, n, arg) calls fn(arg, i) once for each i < n, on any of its threads,
 * and returns when all are done (0, or nonzero when it could not). */
typedef void (*task_fn_t)(void *arg, size_t i);
typedef struct {
    int (*run)(void *state, task_fn_t fn, size_t n, void *arg);
    void *state;
} worker_pool_t;

static void expert_task(void *arg, size_t i) {
    expert_call_t *c = arg;
    float *xt = thread_buffer(BUF_TILE, sizeof(float) * tile_floats(c));
    if (xt == NULL) __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
    else expert_item(c, (int64_t)i, xt);
}

/* The whole MoE FFN for n_tok frames (inference), in one call:
 *   out[t] = sum_j gates[t, j] * expert_{top_idx[t, j]}(x[t])   for j < k,
 *   expert_e(v) = act(v W1_e + b1_e) W2_e + b2_e   (W1_e: dim x hidden, W2_e: hidden x dim,
 *   both packed as above with elements of type wt, scale1 (n_expert x hidden) and scale2
 *   (n_expert x dim) their column scales for WT_I8; act is ACT_NONE, ACT_RELU or ACT_SILU,
 *   plus ACT_BF16 to round v, the hidden units and the expert's output to bfloat16).
 * The n_tok*k assignments are counting-sorted by expert (stable), their frames gathered
 * into expert-contiguous rows, each expert with rows runs its two linears on its slice,
 * and the gated rows are added back to their frames (each frame sums its k rows in
 * slot order, so the result does not depend on `threads`). Returns 0, -1 if an expert
 * id is outside [0, n_expert), -2 when out of memory (out is then not written), -3 for
 * an unknown wt. The expert loop runs on `threads` OpenMP threads, or on `pool` when
 * given (-5 when the pool could not run it).
 * Work space: x_sorted and y_sorted n_tok*k*dim floats each, h n_tok*k*hidden floats,
 * order 2*n_tok*k + 2*n_expert int64. */
static int moe_forward(const float *x, int64_t n_tok, int dim, const int64_t *top_idx, const float *gates,
                       int k, int n_expert, int hidden, const void *w1_packed, const float *scale1,
                       const float *b1, const void *w2_packed, const float *scale2, const float *b2,
                       int wt, int act, float *x_sorted, float *h, float *y_sorted, int64_t *order,
                       float *out, int threads, const worker_pool_t *pool) {
    if (!known_type(wt, dim, hidden)) return -3;
    const int bf16_rows = (act & ACT_BF16) != 0;
    act &= ~ACT_BF16;
    const int64_t n_assign = n_tok * k;
    int64_t *start = order + n_assign, *fill = start + n_expert, *where = fill + n_expert;
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
    for (int64_t a = 0; a < n_assign; a++) {
        where[a] = fill[top_idx[a]];
        order[fill[top_idx[a]]++] = a;
    }
    for (int64_t i = 0; i < n_assign; i++)
        memcpy(x_sorted + i * dim, x + (order[i] / k) * dim, sizeof(float) * (size_t)dim);
    if (bf16_rows) round_bf16(x_sorted, n_assign * dim);
    for (int e = 0; e < n_expert; e++) fill[e] -= start[e];    /* fill -> rows per expert */
    item_t *items = malloc(sizeof(item_t) * (size_t)(n_assign / MAX_TILE + n_expert + 1));
    if (items == NULL) return -2;
    expert_call_t call = {
        .items = items, .n_items = make_items(start, fill, n_expert, threads, items), .dim = dim,
        .hidden = hidden, .w1 = w1_packed, .scale1 = scale1, .b1 = b1, .w2 = w2_packed, .scale2 = scale2,
        .b2 = b2, .wt = wt, .act = act, .bf16_rows = bf16_rows, .x_sorted = x_sorted, .h = h,
        .y_sorted = y_sorted, .failed = 0};
    int status = 0;
    if (pool != NULL) {
        if (pool->run(pool->state, expert_task, (size_t)call.n_items, &call) != 0) status = -5;
    } else {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1 && call.n_items > 1)
        for (int64_t i = 0; i < call.n_items; i++) expert_task(&call, (size_t)i);
    }
    if (status == 0 && call.failed) status = -2;
    free(items);
    if (status != 0) return status;
    for (int64_t t = 0; t < n_tok; t++) {   /* each frame: its k gated rows, in slot order */
        float *o = out + t * dim;
        const float *y = y_sorted + where[t * k] * dim;
        const float g = gates[t * k];
        for (int c = 0; c < dim; c++) o[c] = g * y[c];
        for (int j = 1; j < k; j++) {
            const float *yj = y_sorted + where[t * k + j] * dim;
            const float gj = gates[t * k + j];
            for (int c = 0; c < dim; c++) o[c] += gj * yj[c];
        }
    }
    return 0;
}

int wm_moe_forward(const float *x, int64_t n_tok, int dim, const int64_t *top_idx, const float *gates,
                   int k, int n_expert, int hidden, const void *w1_packed, const float *scale1,
                   const float *b1, const void *w2_packed, const float *scale2, const float *b2,
                   int wt, int act, float *x_sorted, float *h, float *y_sorted, int64_t *order,
                   float *out, int threads) {
    return moe_forward(x, n_tok, dim, top_idx, gates, k, n_expert, hidden, w1_packed, scale1, b1,
                       w2_packed, scale2, b2, wt, act, x_sorted, h, y_sorted, order, out, threads, NULL);
}

/* The router of an MoE FFN (inference), for n_tok frames:
 *   logits[t] = [emb[t], x[t]] W + b   (emb: emb_dim floats per frame, none when emb_dim
 *   is 0; W given transposed, wt_router: (emb_dim + dim) x n_expert row-major; b may be
 *   NULL), top_idx[t] = the k largest logits, largest first (equal logits: the lower
 *   expert first), gates[t] = softmax over those k logits (renormalize) or the
 *   full-softmax probabilities of the chosen experts. Sums run over the input in order,
 *   so the routing does not depend on `threads`. */
#define MAX_ROUTED_EXPERTS 256
#define ROUTE_FRAMES 4
/* logit[m][e] for the nb (<= ROUTE_FRAMES, a constant after inlining) frames from
 * frame t0, in experts of 8 lanes: each weight row of 8 experts is loaded once for the
 * nb frames (nb independent FMA chains; one frame at a time, the chain's latency made
 * the routing of 1024 frames 0.57 ms, 2.5 % of the layer). Each logit is summed in
 * input order (bias, emb, x) whatever nb, so a frame's routing does not depend on the
 * frames beside it or on `threads`. */
static INLINE void router_logits(const float *x, const int64_t t0, const int nb, int dim,
                                 const float *emb, int emb_dim, const float *wt_router,
                                 const float *b, int n_expert, float logit[][MAX_ROUTED_EXPERTS]) {
    int e0 = 0;
    for (; e0 + 8 <= n_expert; e0 += 8) {
        const vec8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
        vec8 acc[ROUTE_FRAMES];
        for (int m = 0; m < nb; m++) acc[m] = b == NULL ? zero : load8(b + e0);
        for (int d = 0; d < emb_dim; d++) {
            const vec8 w = load8(wt_router + (int64_t)d * n_expert + e0);
            for (int m = 0; m < nb; m++) acc[m] += emb[(t0 + m) * emb_dim + d] * w;
        }
        for (int d = 0; d < dim; d++) {
            const vec8 w = load8(wt_router + (int64_t)(emb_dim + d) * n_expert + e0);
            for (int m = 0; m < nb; m++) acc[m] += x[(t0 + m) * dim + d] * w;
        }
        for (int m = 0; m < nb; m++) store8(logit[m] + e0, acc[m]);
    }
    for (int m = 0; m < nb; m++) {      /* experts past the last group of 8 */
        const float *xt = x + (t0 + m) * dim, *et = emb_dim ? emb + (t0 + m) * emb_dim : NULL;
        float *l = logit[m];
        for (int e = e0; e < n_expert; e++) l[e] = b == NULL ? 0.0f : b[e];
        for (int d = 0; d < emb_dim; d++)
            for (int e = e0; e < n_expert; e++) l[e] += et[d] * wt_router[(int64_t)d * n_expert + e];
        for (int d = 0; d < dim; d++)
            for (int e = e0; e < n_expert; e++) l[e] += xt[d] * wt_router[(int64_t)(emb_dim + d) * n_expert + e];
    }
}

static void route(const float *x, int64_t n_tok, int dim, const float *emb, int emb_dim,
                  const float *wt_router, const float *b, int n_expert, int k, int renormalize,
                  int64_t *top_idx, float *gates) {
    float logits[ROUTE_FRAMES][MAX_ROUTED_EXPERTS];
    for (int64_t t = 0; t < n_tok; t++) {
        const int64_t m = t % ROUTE_FRAMES;
        if (m == 0) {
            const int64_t nb = n_tok - t < ROUTE_FRAMES ? n_tok - t : ROUTE_FRAMES;
            switch (nb) {
            case 4: router_logits(x, t, 4, dim, emb, emb_dim, wt_router, b, n_expert, logits); break;
            case 3: router_logits(x, t, 3, dim, emb, emb_dim, wt_router, b, n_expert, logits); break;
            case 2: router_logits(x, t, 2, dim, emb, emb_dim, wt_router, b, n_expert, logits); break;
            default: router_logits(x, t, 1, dim, emb, emb_dim, wt_router, b, n_expert, logits); break;
            }
        }
        const float *logit = logits[m];
        int64_t *idx = top_idx + t * k;
        float *g = gates + t * k;
        for (int j = 0; j < k; j++) {     /* selection: k is small */
            int best = -1;
            for (int e = 0; e < n_expert; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= idx[i] == e;
                if (!taken && (best < 0 || logit[e] > logit[best])) best = e;
            }
            idx[j] = best;
        }
        const float top = logit[idx[0]];
        float sum = 0.0f;
        if (renormalize) {
            for (int j = 0; j < k; j++) sum += g[j] = expf(logit[idx[j]] - top);
        } else {
            for (int e = 0; e < n_expert; e++) sum += expf(logit[e] - top);
            for (int j = 0; j < k; j++) g[j] = expf(logit[idx[j]] - top);
        }
        for (int j = 0; j < k; j++) g[j] /= sum;
    }
}

/* wm_moe_forward with the routing done here first (`route` above): the chosen experts
 * and their gates are written to top_idx and gates (n_tok x k each). Returns as
 * wm_moe_forward, or -4 when n_expert > MAX_ROUTED_EXPERTS or k is not in 1..n_expert. */
static int moe_routed_forward(const float *x, int64_t n_tok, int dim, const float *emb, int emb_dim,
                              const float *wt_router, const float *b_router, int renormalize,
                              int64_t *top_idx, float *gates, int k, int n_expert, int hidden,
                              const void *w1_packed, const float *scale1, const float *b1,
                              const void *w2_packed, const float *scale2, const float *b2, int wt,
                              int act, float *x_sorted, float *h, float *y_sorted, int64_t *order,
                              float *out, int threads, const worker_pool_t *pool) {
    if (n_expert > MAX_ROUTED_EXPERTS || k < 1 || k > n_expert) return -4;
    route(x, n_tok, dim, emb, emb_dim, wt_router, b_router, n_expert, k, renormalize, top_idx, gates);
    return moe_forward(x, n_tok, dim, top_idx, gates, k, n_expert, hidden, w1_packed, scale1, b1,
                       w2_packed, scale2, b2, wt, act, x_sorted, h, y_sorted, order, out, threads, pool);
}

int wm_moe_routed_forward(const float *x, int64_t n_tok, int dim, const float *emb, int emb_dim,
                          const float *wt_router, const float *b_router, int renormalize,
                          int64_t *top_idx, float *gates, int k, int n_expert, int hidden,
                          const void *w1_packed, const float *scale1, const float *b1,
                          const void *w2_packed, const float *scale2, const float *b2, int wt, int act,
                          float *x_sorted, float *h, float *y_sorted, int64_t *order, float *out,
                          int threads) {
    return moe_routed_forward(x, n_tok, dim, emb, emb_dim, wt_router, b_router, renormalize, top_idx,
                              gates, k, n_expert, hidden, w1_packed, scale1, b1, w2_packed, scale2, b2,
                              wt, act, x_sorted, h, y_sorted, order, out, threads, NULL);
}

/* ---- ONNX Runtime custom op ---------------------------------------------------------
 * `wenet_moe.kernel::RoutedExperts`: wm_moe_routed_forward as one node of an ONNX
 * Runtime session, so that a whole streaming encoder runs in one session (no pieces,
 * one thread pool) and the expert loop runs on that session's intra-op threads
 * (KernelContext_ParallelFor) instead of OpenMP's. ONNX Runtime loads this library
 * with SessionOptions.register_custom_ops_library and calls RegisterCustomOps.
 *   inputs  0 x (..., D) float          1 route_emb (..., E_emb) float (E_emb may be 0)
 *           2 router_t (E_emb + D, E)    3 router_b (E,)
 *           4 w1: the packed (E, D, H) experts' bytes (uint8, any shape)
 *           5 scale1: column scales of w1 (WT_I8: E x H floats, WT_Q8: E x 2H words,
 *             else empty)               6 b1 (E, H)
 *           7 w2: packed (E, H, D) bytes 8 scale2                     9 b2 (E, D)
 *           10 threads: int64, the session's intra-op threads (above 1 the expert loop
 *             is shared out on them; the runtime supplies it with the weights)
 *   attributes k, renormalize (0 / 1), activation (ACT_*), weights (WT_*)
 *   output  (..., D) float
 * The wheel ships no C headers, so the few parts of ONNX Runtime's C ABI used here are
 * declared below: OrtApi is a table of function pointers that only grows between
 * releases (the slots are their positions in it), OrtCustomOp a struct of callbacks
 * read up to its `version`. */
typedef struct ort_status ort_status_t;
typedef void (*ort_fn_t)(void);
typedef struct {
    const ort_fn_t *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} ort_api_base_t;

#define ORT_API_WANTED 18      /* ONNX Runtime 1.18: has every slot below */
enum {
    ORT_CreateStatus = 0, ORT_CreateCustomOpDomain = 26, ORT_CustomOpDomain_Add = 27,
    ORT_AddCustomOpDomain = 28, ORT_GetTensorMutableData = 51, ORT_GetDimensionsCount = 61,
    ORT_GetDimensions = 62, ORT_GetTensorTypeAndShape = 65, ORT_KernelInfoGetAttribute_int64 = 86,
    ORT_KernelContext_GetInput = 90, ORT_KernelContext_GetOutput = 91, ORT_ReleaseStatus = 93,
    ORT_ReleaseTensorTypeAndShapeInfo = 99, ORT_KernelContext_ParallelFor = 274,
};
enum { ORT_INVALID_ARGUMENT = 2, ORT_RUNTIME_EXCEPTION = 6 };      /* OrtErrorCode */
enum { ORT_FLOAT = 1, ORT_UINT8 = 2, ORT_INT64 = 7 };                             /* ONNXTensorElementDataType */

static const ort_fn_t *ort_api;

typedef ort_status_t *(*create_status_t)(int code, const char *msg);
typedef ort_status_t *(*get_input_t)(const void *ctx, size_t index, const void **value);
typedef ort_status_t *(*get_output_t)(void *ctx, size_t index, const int64_t *dims, size_t rank, void **value);
typedef ort_status_t *(*tensor_data_t)(const void *value, void **data);
typedef ort_status_t *(*type_and_shape_t)(const void *value, void **info);
typedef ort_status_t *(*dims_count_t)(const void *info, size_t *rank);
typedef ort_status_t *(*dims_t)(const void *info, int64_t *dims, size_t rank);
typedef void (*release_t)(void *object);
typedef ort_status_t *(*attr_int64_t)(const void *info, const char *name, int64_t *value);
typedef ort_status_t *(*parallel_for_t)(const void *ctx, task_fn_t fn, size_t total, size_t batches, void *arg);
typedef ort_status_t *(*create_domain_t)(const char *name, void **domain);
typedef ort_status_t *(*domain_add_t)(void *domain, const void *op);
typedef ort_status_t *(*add_domain_t)(void *options, void *domain);
#define ORT(slot, type) ((type)ort_api[ORT_##slot])

#define OP_MAX_RANK 8
enum { IN_X, IN_EMB, IN_ROUTER_T, IN_ROUTER_B, IN_W1, IN_SCALE1, IN_B1, IN_W2, IN_SCALE2, IN_B2, IN_THREADS,
       N_INPUTS };

typedef struct { int64_t k, renormalize, act, wt; } op_kernel_t;

#define OP_NAME "wenet_moe.kernel::RoutedExperts"

/* an error status: OP_NAME, ": " and the formatted message */
static ort_status_t *op_error(const int code, const char *fmt, ...) {
    char msg[320];
    int n = snprintf(msg, sizeof msg, "%s: ", OP_NAME);
    va_list args;
    va_start(args, fmt);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, args);
    va_end(args);
    return ORT(CreateStatus, create_status_t)(code, msg);
}

/* value's shape into dims (rank <= OP_MAX_RANK) and its data */
static ort_status_t *tensor_view(const void *value, int64_t *dims, size_t *rank, void **data) {
    void *info = NULL;
    ort_status_t *st = ORT(GetTensorTypeAndShape, type_and_shape_t)(value, &info);
    if (st == NULL) st = ORT(GetDimensionsCount, dims_count_t)(info, rank);
    if (st == NULL && *rank > OP_MAX_RANK)
        st = op_error(ORT_INVALID_ARGUMENT, "an input of rank %zu (at most %d)", *rank, OP_MAX_RANK);
    if (st == NULL) st = ORT(GetDimensions, dims_t)(info, dims, *rank);
    if (info != NULL) ORT(ReleaseTensorTypeAndShapeInfo, release_t)(info);
    if (st == NULL) st = ORT(GetTensorMutableData, tensor_data_t)(value, data);
    return st;
}

static int64_t elements(const int64_t *dims, const size_t rank) {
    int64_t n = 1;
    for (size_t i = 0; i < rank; i++) n *= dims[i];
    return n;
}

static int ort_pool_run(void *ctx, task_fn_t fn, size_t n, void *arg) {
    ort_status_t *st = ORT(KernelContext_ParallelFor, parallel_for_t)(ctx, fn, n, 0, arg);
    if (st == NULL) return 0;
    ORT(ReleaseStatus, release_t)(st);
    return 1;
}

static ort_status_t *op_compute(void *kernel, void *ctx) {
    const op_kernel_t *kn = kernel;
    int64_t dims[N_INPUTS][OP_MAX_RANK];
    size_t rank[N_INPUTS];
    void *data[N_INPUTS];
    for (int i = 0; i < N_INPUTS; i++) {
        const void *value = NULL;
        ort_status_t *st = ORT(KernelContext_GetInput, get_input_t)(ctx, (size_t)i, &value);
        if (st == NULL && value == NULL) st = op_error(ORT_INVALID_ARGUMENT, "input %d is missing", i);
        if (st == NULL) st = tensor_view(value, dims[i], &rank[i], &data[i]);
        if (st != NULL) return st;
    }
    if (rank[IN_X] < 1 || rank[IN_ROUTER_T] != 2 || rank[IN_ROUTER_B] != 1 || rank[IN_B1] != 2 || rank[IN_B2] != 2)
        return op_error(ORT_INVALID_ARGUMENT, "x, router_t, router_b, b1, b2 must have rank >= 1, 2, 1, 2, 2; "
                        "got %zu, %zu, %zu, %zu, %zu", rank[IN_X], rank[IN_ROUTER_T], rank[IN_ROUTER_B],
                        rank[IN_B1], rank[IN_B2]);
    const int64_t dim = dims[IN_X][rank[IN_X] - 1], n_expert = dims[IN_ROUTER_B][0], hidden = dims[IN_B1][1];
    const int64_t n_tok = dim > 0 ? elements(dims[IN_X], rank[IN_X]) / dim : 0;
    const int64_t emb_dim = dims[IN_ROUTER_T][0] - dim;
    if (dim <= 0 || dim % 16 || hidden <= 0 || hidden % 16)
        return op_error(ORT_INVALID_ARGUMENT, "D = %lld and H = %lld must be positive multiples of 16",
                        (long long)dim, (long long)hidden);
    if (n_expert < 1 || n_expert > MAX_ROUTED_EXPERTS || kn->k > n_expert)
        return op_error(ORT_INVALID_ARGUMENT, "%lld experts with k = %lld (at most %d experts, k of them)",
                        (long long)n_expert, (long long)kn->k, MAX_ROUTED_EXPERTS);
    if (emb_dim < 0 || dims[IN_ROUTER_T][1] != n_expert)
        return op_error(ORT_INVALID_ARGUMENT, "router_t must be (E_emb + %lld, %lld), got (%lld, %lld)",
                        (long long)dim, (long long)n_expert, (long long)dims[IN_ROUTER_T][0],
                        (long long)dims[IN_ROUTER_T][1]);
    if (elements(dims[IN_EMB], rank[IN_EMB]) != n_tok * emb_dim)
        return op_error(ORT_INVALID_ARGUMENT, "route_emb must hold %lld x %lld values", (long long)n_tok,
                        (long long)emb_dim);
    if (dims[IN_B1][0] != n_expert || dims[IN_B2][0] != n_expert || dims[IN_B2][1] != dim)
        return op_error(ORT_INVALID_ARGUMENT, "b1 must be (%lld, H) and b2 (%lld, %lld)", (long long)n_expert,
                        (long long)n_expert, (long long)dim);
    const int64_t matrix = n_expert * dim * hidden * wt_size((int)kn->wt);
    if (elements(dims[IN_W1], rank[IN_W1]) != matrix || elements(dims[IN_W2], rank[IN_W2]) != matrix)
        return op_error(ORT_INVALID_ARGUMENT, "w1 and w2 must hold %lld bytes each (%lld x %lld x %lld x %d)",
                        (long long)matrix, (long long)n_expert, (long long)dim, (long long)hidden,
                        wt_size((int)kn->wt));
    const int64_t per_col = kn->wt == WT_Q8 ? 2 : kn->wt == WT_I8 ? 1 : 0;
    if (elements(dims[IN_THREADS], rank[IN_THREADS]) != 1 || *(const int64_t *)data[IN_THREADS] < 1)
        return op_error(ORT_INVALID_ARGUMENT, "threads must be one number >= 1");
    const int64_t threads = *(const int64_t *)data[IN_THREADS];
    if (elements(dims[IN_SCALE1], rank[IN_SCALE1]) != n_expert * hidden * per_col
        || elements(dims[IN_SCALE2], rank[IN_SCALE2]) != n_expert * dim * per_col)
        return op_error(ORT_INVALID_ARGUMENT, "scale1 and scale2 must hold %lld words per column of each expert",
                        (long long)per_col);
    void *out_value = NULL, *out = NULL;
    ort_status_t *st = ORT(KernelContext_GetOutput, get_output_t)(ctx, 0, dims[IN_X], rank[IN_X], &out_value);
    if (st == NULL) st = ORT(GetTensorMutableData, tensor_data_t)(out_value, &out);
    if (st != NULL || n_tok == 0) return st;
    const int64_t n_assign = n_tok * kn->k;
    const size_t float_bytes = ((size_t)n_assign * (size_t)(2 * dim + hidden + 1) * sizeof(float) + 63) / 64 * 64;
    const size_t words = (size_t)(3 * n_assign + 2 * n_expert);    /* order, then top_idx */
    char *work = thread_buffer(BUF_WORK, float_bytes + words * sizeof(int64_t));
    if (work == NULL)
        return op_error(ORT_RUNTIME_EXCEPTION, "out of memory for the work space of %lld rows", (long long)n_assign);
    float *x_sorted = (float *)work, *h = x_sorted + n_assign * dim, *y_sorted = h + n_assign * hidden;
    float *gates = y_sorted + n_assign * dim;
    int64_t *order = (int64_t *)(work + float_bytes), *top_idx = order + 2 * n_assign + 2 * n_expert;
    const worker_pool_t pool = {ort_pool_run, ctx};
    const int status = moe_routed_forward(
        data[IN_X], n_tok, (int)dim, data[IN_EMB], (int)emb_dim, data[IN_ROUTER_T], data[IN_ROUTER_B],
        (int)kn->renormalize, top_idx, gates, (int)kn->k, (int)n_expert, (int)hidden, data[IN_W1],
        per_col ? data[IN_SCALE1] : NULL, data[IN_B1], data[IN_W2], per_col ? data[IN_SCALE2] : NULL,
        data[IN_B2], (int)kn->wt, (int)kn->act, x_sorted, h, y_sorted, order, out, (int)threads,
        threads > 1 ? &pool : NULL);
    if (status == -2) return op_error(ORT_RUNTIME_EXCEPTION, "out of memory for the tile buffers");
    if (status != 0) return op_error(ORT_RUNTIME_EXCEPTION, "the kernel failed (status %d)", status);
    return NULL;
}

static ort_status_t *op_create(const void *op, const void *api, const void *info, void **kernel) {
    (void)op, (void)api;
    static const char *names[] = {"k", "renormalize", "activation", "weights"};
    int64_t v[4];
    for (int i = 0; i < 4; i++) {
        ort_status_t *st = ORT(KernelInfoGetAttribute_int64, attr_int64_t)(info, names[i], &v[i]);
        if (st != NULL) return st;
    }
    if (v[0] < 1 || (v[1] != 0 && v[1] != 1) || v[2] < ACT_NONE || v[2] > ACT_SILU
        || !(v[3] == WT_F32 || v[3] == WT_BF16 || v[3] == WT_I8 || v[3] == WT_Q8))
        return op_error(ORT_INVALID_ARGUMENT, "bad attributes k=%lld renormalize=%lld activation=%lld "
                        "weights=%lld", (long long)v[0], (long long)v[1], (long long)v[2], (long long)v[3]);
    op_kernel_t *kn = malloc(sizeof *kn);
    if (kn == NULL) return op_error(ORT_RUNTIME_EXCEPTION, "out of memory");
    *kn = (op_kernel_t){.k = v[0], .renormalize = v[1], .act = v[2], .wt = v[3]};
    *kernel = kn;
    return NULL;
}

static void op_destroy(void *kernel) { free(kernel); }
static const char *op_name(const void *op) { (void)op; return "RoutedExperts"; }
static const char *op_provider(const void *op) { (void)op; return "CPUExecutionProvider"; }
static int op_input_type(const void *op, size_t i) {
    (void)op;
    return i == IN_W1 || i == IN_W2 ? ORT_UINT8 : i == IN_THREADS ? ORT_INT64 : ORT_FLOAT;
}
static size_t op_input_count(const void *op) { (void)op; return N_INPUTS; }
static int op_output_type(const void *op, size_t i) { (void)op, (void)i; return ORT_FLOAT; }
static size_t op_output_count(const void *op) { (void)op; return 1; }
static int op_required(const void *op, size_t i) { (void)op, (void)i; return 0; }     /* INPUT_OUTPUT_REQUIRED */
static int op_default_memory(const void *op, size_t i) { (void)op, (void)i; return 0; }
static int op_one(const void *op) { (void)op; return 1; }

/* OrtCustomOp up to the callbacks of version 16 (CreateKernelV2 / KernelComputeV2 return
 * a status); the later members exist and are NULL */
typedef struct {
    uint32_t version;
    void *(*CreateKernel)(const void *op, const void *api, const void *info);
    const char *(*GetName)(const void *op);
    const char *(*GetExecutionProviderType)(const void *op);
    int (*GetInputType)(const void *op, size_t i);
    size_t (*GetInputTypeCount)(const void *op);
    int (*GetOutputType)(const void *op, size_t i);
    size_t (*GetOutputTypeCount)(const void *op);
    void (*KernelCompute)(void *kernel, void *ctx);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const void *op, size_t i);
    int (*GetOutputCharacteristic)(const void *op, size_t i);
    int (*GetInputMemoryType)(const void *op, size_t i);
    int (*GetVariadicInputMinArity)(const void *op);
    int (*GetVariadicInputHomogeneity)(const void *op);
    int (*GetVariadicOutputMinArity)(const void *op);
    int (*GetVariadicOutputHomogeneity)(const void *op);
    ort_status_t *(*CreateKernelV2)(const void *op, const void *api, const void *info, void **kernel);
    ort_status_t *(*KernelComputeV2)(void *kernel, void *ctx);
    void *later[8];     /* InferOutputShapeFn ... : not used */
} ort_custom_op_t;

static const ort_custom_op_t routed_experts_op = {
    .version = 16, .CreateKernel = NULL, .GetName = op_name, .GetExecutionProviderType = op_provider,
    .GetInputType = op_input_type, .GetInputTypeCount = op_input_count, .GetOutputType = op_output_type,
    .GetOutputTypeCount = op_output_count, .KernelCompute = NULL, .KernelDestroy = op_destroy,
    .GetInputCharacteristic = op_required, .GetOutputCharacteristic = op_required,
    .GetInputMemoryType = op_default_memory, .GetVariadicInputMinArity = op_one,
    .GetVariadicInputHomogeneity = op_one, .GetVariadicOutputMinArity = op_one,
    .GetVariadicOutputHomogeneity = op_one, .CreateKernelV2 = op_create, .KernelComputeV2 = op_compute,
};

/* what ONNX Runtime calls when a session's options load this library: the op's domain
 * "wenet_moe.kernel" added to `options` (NULL: done; an ONNX Runtime older than
 * ORT_API_WANTED gets no op, and a graph using it then fails to load, naming it) */
ort_status_t *RegisterCustomOps(void *options, const ort_api_base_t *base) {
    const ort_fn_t *api = base->GetApi(ORT_API_WANTED);
    if (api == NULL) return NULL;
    ort_api = api;
    void *domain = NULL;
    ort_status_t *st = ORT(CreateCustomOpDomain, create_domain_t)("wenet_moe.kernel", &domain);
    if (st == NULL) st = ORT(CustomOpDomain_Add, domain_add_t)(domain, &routed_experts_op);
    if (st == NULL) st = ORT(AddCustomOpDomain, add_domain_t)(options, domain);
    return st;
}

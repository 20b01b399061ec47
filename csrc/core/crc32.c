/*
 * crc32.c — CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320: what zlib.crc32 computes).
 *
 * verify_checksums checks every expert blob as it is read, on the I/O threads, so the CRC must keep up
 * with the disk: slicing-by-8 does ~1.5-2 GB/s a core, which halved decode under a budget when reads
 * came from memory (bench/RESULTS.md). Where the CPU has a carry-less multiply (x86 PCLMULQDQ) the bulk
 * is folded 64 bytes at a time instead; arm64's CRC32 instructions compute this polynomial directly.
 * Picked at run time; the table version stays for the rest and for CPUs without either.
 *
 * Folding (Gopal et al., "Fast CRC computation for generic polynomials using PCLMULQDQ", Intel 2009):
 * the message is a polynomial over GF(2), and a 128-bit block B followed by D more bits contributes
 * B·x^D to it; modulo P that is lo(B)·(x^(D+32) mod P) + hi(B)·(x^(D-32) mod P) in the reflected
 * bit order, two 64x33-bit carry-less products that fit in 128 bits. Four accumulators take 64 bytes
 * a step (D = 512), then fold into one (D = 128); the last 128 bits and the tail go through the table
 * (a raw CRC of the accumulator's bytes equals that of everything folded into it).
 */
#include <pthread.h>
#include <string.h>

#include "util.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FM_CRC_CLMUL 1
#elif defined(__aarch64__) && (defined(__linux__) || defined(__APPLE__))
#include <arm_acle.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#define FM_CRC_ARM 1
#endif

static uint32_t g_table[8][256];

static void table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        g_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) g_table[t][i] = (g_table[t - 1][i] >> 8) ^ g_table[0][g_table[t - 1][i] & 0xff];
}

/* The raw register update (no inversions) by slicing-by-8. */
static uint32_t crc_table(uint32_t crc, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= crc;
        crc = g_table[7][lo & 0xff] ^ g_table[6][(lo >> 8) & 0xff] ^ g_table[5][(lo >> 16) & 0xff] ^
              g_table[4][lo >> 24] ^ g_table[3][hi & 0xff] ^ g_table[2][(hi >> 8) & 0xff] ^
              g_table[1][(hi >> 16) & 0xff] ^ g_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = g_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if FM_CRC_CLMUL
/* (x^e mod P) in the reflected order, shifted left by one (the carry-less product of two reflected
 * operands comes out one bit low): e = 544, 480 for 512-bit folds, 160, 96 for 128-bit ones
 * (tests/test_ops.py checks the result against zlib at every length and alignment that matters). */
#define K512_LO 0x154442bd4ull
#define K512_HI 0x1c6e41596ull
#define K128_LO 0x1751997d0ull
#define K128_HI 0x0ccaa009eull

__attribute__((target("pclmul,sse2"))) static inline __m128i fold(__m128i a, __m128i k) {
    return _mm_xor_si128(_mm_clmulepi64_si128(a, k, 0x00), _mm_clmulepi64_si128(a, k, 0x11));
}

/* n >= 64. The raw register crc is XORed into the first 4 bytes, which is what it does to the CRC. */
__attribute__((target("pclmul,sse2"))) static uint32_t crc_clmul(uint32_t crc, const uint8_t *p, size_t n) {
    const __m128i k512 = _mm_set_epi64x((long long)K512_HI, (long long)K512_LO);
    const __m128i k128 = _mm_set_epi64x((long long)K128_HI, (long long)K128_LO);
    __m128i a0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)crc));
    __m128i a1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i a2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i a3 = _mm_loadu_si128((const __m128i *)(p + 48));
    p += 64;
    n -= 64;
    for (; n >= 64; p += 64, n -= 64) {
        a0 = _mm_xor_si128(fold(a0, k512), _mm_loadu_si128((const __m128i *)p));
        a1 = _mm_xor_si128(fold(a1, k512), _mm_loadu_si128((const __m128i *)(p + 16)));
        a2 = _mm_xor_si128(fold(a2, k512), _mm_loadu_si128((const __m128i *)(p + 32)));
        a3 = _mm_xor_si128(fold(a3, k512), _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    __m128i a = _mm_xor_si128(fold(a0, k128), a1);
    a = _mm_xor_si128(fold(a, k128), a2);
    a = _mm_xor_si128(fold(a, k128), a3);
    for (; n >= 16; p += 16, n -= 16) a = _mm_xor_si128(fold(a, k128), _mm_loadu_si128((const __m128i *)p));
    uint8_t last[16];
    _mm_storeu_si128((__m128i *)last, a);
    return crc_table(crc_table(0, last, 16), p, n);
}
#endif

#if FM_CRC_ARM
__attribute__((target("+crc"))) static uint32_t crc_arm(uint32_t crc, const uint8_t *p, size_t n) {
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        crc = __crc32d(crc, v);
    }
    while (n--) crc = __crc32b(crc, *p++);
    return crc;
}
#endif

enum { CRC_TABLE, CRC_CLMUL, CRC_ARM };
static int g_kind;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    table_init();
    int kind = CRC_TABLE;
#if FM_CRC_CLMUL
    __builtin_cpu_init();
    if (__builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2")) kind = CRC_CLMUL;
#elif FM_CRC_ARM && defined(__APPLE__)
    kind = CRC_ARM; /* every Apple arm64 CPU has the CRC32 instructions */
#elif FM_CRC_ARM
    if (getauxval(AT_HWCAP) & (1ul << 7)) kind = CRC_ARM; /* HWCAP_CRC32 */
#endif
    g_kind = kind;
}

uint32_t fm_crc32(uint32_t crc, const void *data, size_t n) {
    pthread_once(&g_once, crc_init);
    const uint8_t *p = (const uint8_t *)data;
    crc = ~crc;
#if FM_CRC_CLMUL
    if (g_kind == CRC_CLMUL && n >= 64) return ~crc_clmul(crc, p, n);
#endif
#if FM_CRC_ARM
    if (g_kind == CRC_ARM) return ~crc_arm(crc, p, n);
#endif
    return ~crc_table(crc, p, n);
}

uint32_t fm_crc32_portable(uint32_t crc, const void *data, size_t n) {
    pthread_once(&g_once, crc_init);
    return ~crc_table(~crc, (const uint8_t *)data, n);
}

/*
 * test_crc32.c — the engine's CRC-32 (the fastest variant this CPU has: carry-less multiply folding on
 * x86, the CRC32 instructions on arm64) against its table version, at every length to 300 bytes, at odd
 * alignments and chained; built natively and with a cross compiler for qemu-user (tests/test_crc32_c.py).
 * Ends with "N passed, M failed"; exits 1 on any failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

uint32_t fm_crc32(uint32_t crc, const void *data, size_t n);
uint32_t fm_crc32_portable(uint32_t crc, const void *data, size_t n);

int main(void) {
    enum { N = 1 << 16 };
    static uint8_t buf[N + 16];
    uint32_t x = 12345;
    for (size_t i = 0; i < sizeof buf; i++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        buf[i] = (uint8_t)x;
    }
    int passed = 0, failed = 0;
    const uint32_t seeds[2] = {0, 0xDEADBEEFu};
    for (size_t n = 0; n <= 300; n++)
        for (size_t start = 0; start < 16; start += 5)
            for (int s = 0; s < 2; s++) {
                const uint32_t got = fm_crc32(seeds[s], buf + start, n), want = fm_crc32_portable(seeds[s], buf + start, n);
                if (got == want) passed++;
                else if (failed++ < 10) printf("length %zu at +%zu, crc %08x: %08x, table %08x\n", n, start, seeds[s], got, want);
            }
    /* a large buffer, and the chained crc of its two parts */
    const uint32_t whole = fm_crc32_portable(0, buf + 3, N), chained = fm_crc32(fm_crc32(0, buf + 3, 1000), buf + 1003, N - 1000);
    if (fm_crc32(0, buf + 3, N) == whole && chained == whole) passed++;
    else failed++, printf("64 KiB: %08x / chained %08x, table %08x\n", fm_crc32(0, buf + 3, N), chained, whole);
    /* the known check value of CRC-32 */
    if (fm_crc32(0, "123456789", 9) == 0xCBF43926u) passed++;
    else failed++, printf("check value: %08x\n", fm_crc32(0, "123456789", 9));
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}

/*
 * io_shim.c — an LD_PRELOAD library for tests/test_io.py: it watches the expert files (paths containing
 * "/experts/L") and logs every pread on them, and it slows each of those reads down so that the reads in
 * flight at once can be counted. Environment: FLASHMOE_SHIM_LOG (the log file), FLASHMOE_SHIM_DELAY_US
 * (the delay added to each read, default 0).
 *
 * Log lines: "open FD FLAGS PATH" for each expert file opened, "read FD OFFSET BYTES BUFFER_ADDRESS
 * IN_FLIGHT" for each read (IN_FLIGHT: reads on expert files in progress, this one included), each line
 * written with one write(2).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

enum { MAX_FD = 65536 };
static atomic_uchar watched[MAX_FD];
static atomic_int in_flight;
static int log_fd = -1;

__attribute__((constructor)) static void open_log(void) {
    const char *path = getenv("FLASHMOE_SHIM_LOG");
    if (path) log_fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

static void logf_line(const char *fmt, ...) {
    if (log_fd < 0) return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    const int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0) (void)!write(log_fd, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1));
}

static int is_expert_file(const char *path) { return path && strstr(path, "/experts/L") && strstr(path, ".bin"); }

static void opened(int fd, int flags, const char *path) {
    if (fd >= 0 && fd < MAX_FD && is_expert_file(path)) {
        atomic_store(&watched[fd], 1);
        logf_line("open %d %d %s\n", fd, flags, path);
    } else if (fd >= 0 && fd < MAX_FD) {
        atomic_store(&watched[fd], 0);
    }
}

/* The mode argument of open(2), present when the flags create a file. */
#define MODE_OF(flags, mode)                                                                                   \
    do {                                                                                                      \
        if ((flags) & (O_CREAT | __O_TMPFILE)) {                                                              \
            va_list ap;                                                                                       \
            va_start(ap, flags);                                                                              \
            mode = (mode_t)va_arg(ap, int);                                                                   \
            va_end(ap);                                                                                       \
        }                                                                                                     \
    } while (0)

int open(const char *path, int flags, ...) {
    static int (*real)(const char *, int, ...);
    mode_t mode = 0;
    MODE_OF(flags, mode);
    if (!real) real = dlsym(RTLD_NEXT, "open");
    const int fd = real(path, flags, mode);
    opened(fd, flags, path);
    return fd;
}

int open64(const char *path, int flags, ...) {
    static int (*real)(const char *, int, ...);
    mode_t mode = 0;
    MODE_OF(flags, mode);
    if (!real) real = dlsym(RTLD_NEXT, "open64");
    const int fd = real(path, flags, mode);
    opened(fd, flags, path);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...) {
    static int (*real)(int, const char *, int, ...);
    mode_t mode = 0;
    MODE_OF(flags, mode);
    if (!real) real = dlsym(RTLD_NEXT, "openat");
    const int fd = real(dirfd, path, flags, mode);
    opened(fd, flags, path);
    return fd;
}

int openat64(int dirfd, const char *path, int flags, ...) {
    static int (*real)(int, const char *, int, ...);
    mode_t mode = 0;
    MODE_OF(flags, mode);
    if (!real) real = dlsym(RTLD_NEXT, "openat64");
    const int fd = real(dirfd, path, flags, mode);
    opened(fd, flags, path);
    return fd;
}

static ssize_t watched_read(ssize_t (*real)(int, void *, size_t, off_t), int fd, void *buf, size_t n, off_t off) {
    if (fd < 0 || fd >= MAX_FD || !atomic_load(&watched[fd])) return real(fd, buf, n, off);
    const int now = atomic_fetch_add(&in_flight, 1) + 1;
    logf_line("read %d %lld %zu %llu %d\n", fd, (long long)off, n, (unsigned long long)(uintptr_t)buf, now);
    const char *d = getenv("FLASHMOE_SHIM_DELAY_US");
    const long us = d ? atol(d) : 0;
    if (us > 0) {
        struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
        nanosleep(&ts, NULL);
    }
    const ssize_t got = real(fd, buf, n, off);
    atomic_fetch_sub(&in_flight, 1);
    return got;
}

ssize_t pread(int fd, void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pread");
    return watched_read(real, fd, buf, n, off);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pread64");
    return watched_read(real, fd, buf, n, off);
}

int close(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "close");
    if (fd >= 0 && fd < MAX_FD) atomic_store(&watched[fd], 0);
    return real(fd);
}

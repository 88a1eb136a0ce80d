/*
 * Fake libnvidia-ml.so.1 for hardware-free tests: the real nvidia-ml-py loads it unchanged.
 *
 * Devices look like a Tesla V100-SXM2-16GB: memory clock 877 MHz, graphics clocks 1530..135 MHz
 * as 135 + floor(i * 7.5) (the real board's list), 40 W idle, 300 W at full load and max clock,
 * P = idle + (max - idle) * util * (f / fmax)^2.5 (same model as services/powerd/sim_gpu.py).
 * Energy integrates that power over CLOCK_MONOTONIC time, so it only ever grows.
 *
 * Knobs, read when the first nvmlInit* of a process (or after a full shutdown) runs:
 *   FAKE_NVML_ENABLE        must be 1, else nvmlInit fails with NVML_ERROR_DRIVER_NOT_LOADED (a library
 *                           without a driver). Once loaded into a process the fake cannot be unloaded,
 *                           so this keeps it inert for code that runs after the test that wanted it.
 *   FAKE_NVML_DEVICE_COUNT  devices, default 1, at most 8 (0: no devices)
 *   FAKE_NVML_NO_PERMISSION 1: set/reset locked clocks fail with NVML_ERROR_NO_PERMISSION
 *   FAKE_NVML_UTIL          GPU utilization in percent, default 100 (so clock changes show in power)
 *   FAKE_NVML_STATE_FILE    path: after every successful set/reset, one line per device is written,
 *                           "<index> <min_mhz> <max_mhz>" or "<index> reset" (atomic rename)
 *   FAKE_NVML_LOG_FILE      path: every successful set/reset appends "<pid> set <index> <min> <max>" or
 *                           "<pid> reset <index>" (O_APPEND: lines from several processes interleave whole)
 *   FAKE_NVML_PERSIST       1: the first init of a process takes its locks from FAKE_NVML_STATE_FILE, the
 *                           way a real GPU keeps clocks locked after the process that locked them died
 * Each (re)init starts with unlocked clocks unless FAKE_NVML_PERSIST; energy keeps counting like hardware.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_NO_PERMISSION = 4, NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7, NVML_ERROR_DRIVER_NOT_LOADED = 9, NVML_ERROR_UNKNOWN = 999,
};
enum { NVML_CLOCK_GRAPHICS = 0, NVML_CLOCK_SM = 1, NVML_CLOCK_MEM = 2 };

#define MAX_DEVICES 8
#define N_CLOCKS 187 /* 135 + floor(i * 7.5) for i = 0..186 ends at 1530 */
#define MIN_MHZ 135u
#define MAX_MHZ 1530u
#define MEM_MHZ 877u
#define IDLE_W 40.0
#define TDP_W 300.0

typedef struct fake_device {
    unsigned index;
    int locked;
    unsigned lock_min_mhz, lock_max_mhz;
    double energy_mj, last_s; /* energy up to last_s */
    int started;
} fake_device;
typedef fake_device *nvmlDevice_t;
typedef struct { unsigned int gpu; unsigned int memory; } nvmlUtilization_t;

static fake_device devices[MAX_DEVICES];
static unsigned device_count, util_percent;
static int init_count, no_permission;
static char state_file[4096];
static char log_file[4096];
static volatile char lock_flag; /* spinlock: no libpthread needed */

static void lock(void) { while (__atomic_test_and_set(&lock_flag, __ATOMIC_ACQUIRE)) {} }
static void unlock(void) { __atomic_clear(&lock_flag, __ATOMIC_RELEASE); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static unsigned clock_at(unsigned i) { return MIN_MHZ + (i * 15u) / 2u; } /* ascending */

static double sqrt_newton(double x) { /* no libm: the build line links nothing else */
    double r = x > 1.0 ? x : 1.0;
    if (x <= 0.0) return 0.0;
    for (int i = 0; i < 60; i++) r = 0.5 * (r + x / r);
    return r;
}

static unsigned current_mhz(const fake_device *d) {
    if (!d->locked) return MAX_MHZ;
    unsigned best = MIN_MHZ; /* a busy GPU runs at the highest supported clock in the lock */
    for (unsigned i = 0; i < N_CLOCKS; i++)
        if (clock_at(i) <= d->lock_max_mhz) best = clock_at(i);
    return best;
}

static double power_mw(const fake_device *d) {
    double x = (double)current_mhz(d) / MAX_MHZ;
    return 1e3 * (IDLE_W + (TDP_W - IDLE_W) * (util_percent / 100.0) * x * x * sqrt_newton(x));
}

static void integrate(fake_device *d) { /* power is constant between state changes */
    double t = now_s();
    if (d->started && t > d->last_s) d->energy_mj += power_mw(d) * (t - d->last_s);
    d->last_s = t;
    d->started = 1;
}

static void write_state(void) {
    if (!state_file[0]) return;
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", state_file);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    for (unsigned i = 0; i < device_count; i++) {
        if (devices[i].locked) fprintf(f, "%u %u %u\n", i, devices[i].lock_min_mhz, devices[i].lock_max_mhz);
        else fprintf(f, "%u reset\n", i);
    }
    fclose(f);
    rename(tmp, state_file); /* readers in other processes never see half a file */
}

static void log_event(const char *op, unsigned index, unsigned lo, unsigned hi) {
    if (!log_file[0]) return;
    char line[128];
    int n = op[0] == 's' ? snprintf(line, sizeof line, "%d set %u %u %u\n", (int)getpid(), index, lo, hi)
                         : snprintf(line, sizeof line, "%d reset %u\n", (int)getpid(), index);
    int fd = open(log_file, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return;
    if (write(fd, line, (size_t)n) != n) { /* best effort: a test reading the log will notice */ }
    close(fd);
}

static void restore_state(void) { /* FAKE_NVML_PERSIST: locks survive the process, like hardware */
    if (!state_file[0]) return;
    FILE *f = fopen(state_file, "r");
    if (!f) return;
    char line[128];
    while (fgets(line, sizeof line, f)) {
        unsigned i, lo, hi;
        if (sscanf(line, "%u %u %u", &i, &lo, &hi) == 3 && i < MAX_DEVICES) {
            devices[i].locked = 1;
            devices[i].lock_min_mhz = lo;
            devices[i].lock_max_mhz = hi;
        }
    }
    fclose(f);
}

static unsigned env_uint(const char *name, unsigned fallback, unsigned max) {
    const char *v = getenv(name);
    if (!v || !*v) return fallback;
    unsigned long n = strtoul(v, NULL, 10);
    return n > max ? max : (unsigned)n;
}

/* Lets the test helpers tell this library from a real NVML loaded under the same soname. */
int fakeNvmlIsFake(void) { return 1; }

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    lock();
    if (init_count == 0) {
        const char *enable = getenv("FAKE_NVML_ENABLE");
        if (!enable || strcmp(enable, "1") != 0) {
            unlock();
            return NVML_ERROR_DRIVER_NOT_LOADED;
        }
        device_count = env_uint("FAKE_NVML_DEVICE_COUNT", 1, MAX_DEVICES);
        util_percent = env_uint("FAKE_NVML_UTIL", 100, 100);
        const char *np = getenv("FAKE_NVML_NO_PERMISSION");
        no_permission = np && strcmp(np, "1") == 0;
        const char *sf = getenv("FAKE_NVML_STATE_FILE");
        snprintf(state_file, sizeof state_file, "%s", sf ? sf : "");
        const char *lf = getenv("FAKE_NVML_LOG_FILE");
        snprintf(log_file, sizeof log_file, "%s", lf ? lf : "");
        for (unsigned i = 0; i < MAX_DEVICES; i++) {
            integrate(&devices[i]);
            devices[i].index = i;
            devices[i].locked = 0;
        }
        const char *persist = getenv("FAKE_NVML_PERSIST");
        if (persist && strcmp(persist, "1") == 0) restore_state();
    }
    init_count++;
    unlock();
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    lock();
    nvmlReturn_t ret = init_count > 0 ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    if (init_count > 0) init_count--;
    unlock();
    return ret;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!version || length < 16) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(version, length, "535.0.fake");
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!init_count) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = device_count;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!init_count) return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= device_count) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int i, nvmlDevice_t *d) { return nvmlDeviceGetHandleByIndex_v2(i, d); }

/* Every device call starts here: initialised, and a handle we handed out. */
#define CHECK_DEVICE(d)                                                                        \
    do {                                                                                       \
        if (!init_count) return NVML_ERROR_UNINITIALIZED;                                      \
        if ((d) < devices || (d) >= devices + device_count) return NVML_ERROR_INVALID_ARGUMENT; \
    } while (0)

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    CHECK_DEVICE(d);
    const char *n = "Tesla V100-SXM2-16GB";
    if (!name) return NVML_ERROR_INVALID_ARGUMENT;
    if (length < strlen(n) + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(name, n, strlen(n) + 1);
    return NVML_SUCCESS;
}

/* NVML's count in/out protocol: too small (or NULL array) -> required count + INSUFFICIENT_SIZE. */
static nvmlReturn_t fill_list(unsigned int *count, unsigned int *out, unsigned n, const unsigned *values) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (*count < n || !out) { *count = n; return NVML_ERROR_INSUFFICIENT_SIZE; }
    memcpy(out, values, n * sizeof *values);
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedMemoryClocks(nvmlDevice_t d, unsigned int *count, unsigned int *clocks) {
    CHECK_DEVICE(d);
    static const unsigned mem[1] = {MEM_MHZ};
    return fill_list(count, clocks, 1, mem);
}

nvmlReturn_t nvmlDeviceGetSupportedGraphicsClocks(nvmlDevice_t d, unsigned int mem_mhz, unsigned int *count,
                                                  unsigned int *clocks) {
    CHECK_DEVICE(d);
    if (mem_mhz != MEM_MHZ) return NVML_ERROR_NOT_FOUND;
    unsigned desc[N_CLOCKS];
    for (unsigned i = 0; i < N_CLOCKS; i++) desc[i] = clock_at(N_CLOCKS - 1 - i);
    return fill_list(count, clocks, N_CLOCKS, desc);
}

nvmlReturn_t nvmlDeviceSetGpuLockedClocks(nvmlDevice_t d, unsigned int min_mhz, unsigned int max_mhz) {
    CHECK_DEVICE(d);
    if (no_permission) return NVML_ERROR_NO_PERMISSION;
    if (min_mhz > max_mhz || min_mhz < MIN_MHZ || max_mhz > MAX_MHZ) return NVML_ERROR_INVALID_ARGUMENT;
    lock();
    integrate(d);
    d->locked = 1;
    d->lock_min_mhz = min_mhz;
    d->lock_max_mhz = max_mhz;
    write_state();
    log_event("set", d->index, min_mhz, max_mhz);
    unlock();
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceResetGpuLockedClocks(nvmlDevice_t d) {
    CHECK_DEVICE(d);
    if (no_permission) return NVML_ERROR_NO_PERMISSION;
    lock();
    integrate(d);
    d->locked = 0;
    write_state();
    log_event("reset", d->index, 0, 0);
    unlock();
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    CHECK_DEVICE(d);
    if (!uuid || length < 41) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(uuid, length, "GPU-fa4e0000-0000-4000-8000-%012u", d->index);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned int *clock) {
    CHECK_DEVICE(d);
    if (!clock) return NVML_ERROR_INVALID_ARGUMENT;
    if (type == NVML_CLOCK_GRAPHICS || type == NVML_CLOCK_SM) *clock = current_mhz(d);
    else if (type == NVML_CLOCK_MEM) *clock = MEM_MHZ;
    else return NVML_ERROR_INVALID_ARGUMENT;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *power) {
    CHECK_DEVICE(d);
    if (!power) return NVML_ERROR_INVALID_ARGUMENT;
    *power = (unsigned)(power_mw(d) + 0.5);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *energy_mj) {
    CHECK_DEVICE(d);
    if (!energy_mj) return NVML_ERROR_INVALID_ARGUMENT;
    lock();
    integrate(d);
    *energy_mj = (unsigned long long)d->energy_mj;
    unlock();
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *util) {
    CHECK_DEVICE(d);
    if (!util) return NVML_ERROR_INVALID_ARGUMENT;
    util->gpu = util_percent;
    util->memory = util_percent / 2; /* decode is bandwidth-bound, but any plausible value will do */
    return NVML_SUCCESS;
}

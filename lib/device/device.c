#include <config.h>

#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/env.h"
#include "base/log.h"
#include "device/device.h"

/* Enough for any workstation; devices past it are ignored with a warning. */
#define ATM_MAX_DEVICES 64
#define ATM_MAX_PLATFORMS 16

static pthread_once_t devices_once = PTHREAD_ONCE_INIT;
static atm_device devices[ATM_MAX_DEVICES];
static size_t device_count;
static cl_int enumerate_error = CL_SUCCESS;

static void query_string(cl_device_id dev, cl_device_info what, char *out,
                         size_t size)
{
    if (clGetDeviceInfo(dev, what, size, out, NULL) != CL_SUCCESS)
        out[0] = '\0';
    out[size - 1] = '\0';
}

static void query_platform_string(cl_platform_id p, cl_platform_info what,
                                  char *out, size_t size)
{
    if (clGetPlatformInfo(p, what, size, out, NULL) != CL_SUCCESS)
        out[0] = '\0';
    out[size - 1] = '\0';
}

static int contains_nocase(const char *haystack, const char *needle)
{
    size_t n = strlen(needle);
    if (n == 0)
        return 1;
    for (; *haystack; haystack++) {
        size_t i = 0;
        while (i < n && haystack[i] &&
               tolower((unsigned char)haystack[i]) ==
                   tolower((unsigned char)needle[i]))
            i++;
        if (i == n)
            return 1;
    }
    return 0;
}

/* Vendor strings differ between drivers ("Advanced Micro Devices, Inc.",
 * "AuthenticAMD" for a CPU under PoCL), so the platform decides first. */
static atmoe_vendor classify_vendor(const char *platform, const char *vendor)
{
    if (contains_nocase(platform, "Portable Computing Language") ||
        contains_nocase(platform, "pocl"))
        return ATMOE_VENDOR_POCL;
    if (contains_nocase(vendor, "NVIDIA"))
        return ATMOE_VENDOR_NVIDIA;
    if (contains_nocase(vendor, "Advanced Micro Devices") ||
        contains_nocase(vendor, "AMD"))
        return ATMOE_VENDOR_AMD;
    if (contains_nocase(vendor, "Intel"))
        return ATMOE_VENDOR_INTEL;
    return ATMOE_VENDOR_OTHER;
}

static atmoe_device_type classify_type(cl_device_type t)
{
    if (t & CL_DEVICE_TYPE_GPU)
        return ATMOE_DEVICE_TYPE_GPU;
    if (t & CL_DEVICE_TYPE_CPU)
        return ATMOE_DEVICE_TYPE_CPU;
    if (t & CL_DEVICE_TYPE_ACCELERATOR)
        return ATMOE_DEVICE_TYPE_ACCELERATOR;
    return ATMOE_DEVICE_TYPE_OTHER;
}

static void describe(atm_device *d, size_t index)
{
    atmoe_device_info *info = &d->info;
    cl_device_type type = 0;
    cl_uint cu = 0;
    cl_ulong gmem = 0, alloc = 0, lmem = 0;
    size_t wg = 0;
    char ext[8192];

    memset(info, 0, sizeof *info);
    info->index = index;
    query_string(d->id, CL_DEVICE_NAME, info->raw_name, sizeof info->raw_name);
    query_string(d->id, CL_DEVICE_VENDOR, info->vendor_name,
                 sizeof info->vendor_name);
    query_string(d->id, CL_DRIVER_VERSION, info->driver_version,
                 sizeof info->driver_version);
    query_platform_string(d->platform, CL_PLATFORM_NAME, info->platform_name,
                          sizeof info->platform_name);
    query_platform_string(d->platform, CL_PLATFORM_VERSION,
                          info->platform_version,
                          sizeof info->platform_version);
    query_string(d->id, CL_DEVICE_EXTENSIONS, ext, sizeof ext);
    clGetDeviceInfo(d->id, CL_DEVICE_TYPE, sizeof type, &type, NULL);
    clGetDeviceInfo(d->id, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof cu, &cu, NULL);
    clGetDeviceInfo(d->id, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof gmem, &gmem, NULL);
    clGetDeviceInfo(d->id, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof alloc, &alloc,
                    NULL);
    clGetDeviceInfo(d->id, CL_DEVICE_LOCAL_MEM_SIZE, sizeof lmem, &lmem, NULL);
    clGetDeviceInfo(d->id, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof wg, &wg, NULL);

    /* PoCL names its CPU device "pthread-<cpu>"; the prefix says how PoCL
     * runs it, not what it is, and would split tuning entries. */
    const char *name = info->raw_name;
    if (strncmp(name, "pthread-", 8) == 0)
        name += 8;
    snprintf(info->name, sizeof info->name, "%s", name);

    info->vendor = classify_vendor(info->platform_name, info->vendor_name);
    info->type = classify_type(type);
    info->compute_units = cu;
    info->global_mem_bytes = gmem;
    info->max_alloc_bytes = alloc;
    info->local_mem_bytes = lmem;
    info->max_work_group_size = wg;
    info->fp16 = strstr(ext, "cl_khr_fp16") != NULL;
    info->fp64 = strstr(ext, "cl_khr_fp64") != NULL;
}

static void enumerate(void)
{
    cl_platform_id platforms[ATM_MAX_PLATFORMS];
    cl_uint nplat = 0;
    cl_int err = clGetPlatformIDs(ATM_MAX_PLATFORMS, platforms, &nplat);
    if (err == -1001 /* CL_PLATFORM_NOT_FOUND_KHR: no ICD installed */)
        return;
    if (err != CL_SUCCESS) {
        enumerate_error = err;
        return;
    }
    if (nplat > ATM_MAX_PLATFORMS)
        nplat = ATM_MAX_PLATFORMS;
    for (cl_uint p = 0; p < nplat; p++) {
        cl_device_id ids[ATM_MAX_DEVICES];
        cl_uint ndev = 0;
        err = clGetDeviceIDs(platforms[p], CL_DEVICE_TYPE_ALL, ATM_MAX_DEVICES,
                             ids, &ndev);
        if (err != CL_SUCCESS)
            continue; /* a platform without devices is not an error */
        if (ndev > ATM_MAX_DEVICES)
            ndev = ATM_MAX_DEVICES;
        for (cl_uint i = 0; i < ndev; i++) {
            if (device_count == ATM_MAX_DEVICES) {
                atm_log(ATMOE_LOG_WARNING,
                        "more than %d OpenCL devices; the rest are ignored",
                        ATM_MAX_DEVICES);
                return;
            }
            atm_device *d = &devices[device_count];
            d->platform = platforms[p];
            d->id = ids[i];
            describe(d, device_count);
            device_count++;
        }
    }
}

static atmoe_status ensure_enumerated(void)
{
    pthread_once(&devices_once, enumerate);
    if (enumerate_error != CL_SUCCESS)
        return atm_fail_cl(NULL, enumerate_error, "clGetPlatformIDs");
    return ATMOE_STATUS_OK;
}

atmoe_status atm_device_lookup(size_t index, const atm_device **device)
{
    atmoe_status st = ensure_enumerated();
    if (st != ATMOE_STATUS_OK)
        return st;
    if (index >= device_count)
        return atm_fail(NULL, ATMOE_STATUS_DEVICE_NOT_FOUND,
                        "device index %zu is out of range (%zu devices)",
                        index, device_count);
    *device = &devices[index];
    return ATMOE_STATUS_OK;
}

ATMOE_API const char *atmoe_vendor_name(atmoe_vendor vendor)
{
    switch (vendor) {
    case ATMOE_VENDOR_AMD: return "AMD";
    case ATMOE_VENDOR_INTEL: return "Intel";
    case ATMOE_VENDOR_NVIDIA: return "NVIDIA";
    case ATMOE_VENDOR_POCL: return "PoCL";
    case ATMOE_VENDOR_OTHER: return "other";
    }
    return ATM_UNKNOWN_NAME;
}

ATMOE_API const char *atmoe_device_type_name(atmoe_device_type type)
{
    switch (type) {
    case ATMOE_DEVICE_TYPE_CPU: return "CPU";
    case ATMOE_DEVICE_TYPE_GPU: return "GPU";
    case ATMOE_DEVICE_TYPE_ACCELERATOR: return "accelerator";
    case ATMOE_DEVICE_TYPE_OTHER: return "other";
    }
    return ATM_UNKNOWN_NAME;
}

ATMOE_API atmoe_status atmoe_device_get_count(size_t *count)
{
    ATM_CHECK_NULL(NULL, count);
    atmoe_status st = ensure_enumerated();
    *count = device_count;
    return st;
}

ATMOE_API atmoe_status atmoe_device_get_info(size_t index,
                                             atmoe_device_info *info)
{
    ATM_CHECK_NULL(NULL, info);
    const atm_device *d = NULL;
    atmoe_status st = atm_device_lookup(index, &d);
    if (st != ATMOE_STATUS_OK)
        return st;
    *info = d->info;
    return ATMOE_STATUS_OK;
}

static int first_of_type(atmoe_device_type type, size_t *index)
{
    for (size_t i = 0; i < device_count; i++)
        if (devices[i].info.type == type) {
            *index = i;
            return 1;
        }
    return 0;
}

static atmoe_status pick_default(size_t *index)
{
    if (device_count == 0)
        return atm_fail(NULL, ATMOE_STATUS_NO_DEVICE,
                        "no OpenCL device found: is an ICD installed "
                        "(for example pocl-opencl-icd)?");
    if (first_of_type(ATMOE_DEVICE_TYPE_GPU, index) ||
        first_of_type(ATMOE_DEVICE_TYPE_CPU, index))
        return ATMOE_STATUS_OK;
    *index = 0;
    return ATMOE_STATUS_OK;
}

static int parse_index(const char *s, size_t *out)
{
    if (*s == '\0')
        return 0;
    size_t v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9' || v > (SIZE_MAX - 9) / 10)
            return 0;
        v = v * 10 + (size_t)(*p - '0');
    }
    *out = v;
    return 1;
}

static atmoe_status find(const char *sel, size_t *index, const char *origin)
{
    if (*sel == '\0' || strcmp(sel, "default") == 0)
        return pick_default(index);
    if (device_count == 0)
        return atm_fail(NULL, ATMOE_STATUS_NO_DEVICE,
                        "no OpenCL device found while looking for '%s'%s",
                        sel, origin);

    size_t i;
    if (parse_index(sel, &i)) {
        if (i < device_count) {
            *index = i;
            return ATMOE_STATUS_OK;
        }
        return atm_fail(NULL, ATMOE_STATUS_DEVICE_NOT_FOUND,
                        "device index %s%s is out of range: %zu device%s found",
                        sel, origin, device_count,
                        device_count == 1 ? "" : "s");
    }

    static const struct {
        const char *word;
        atmoe_device_type type;
    } types[] = {{"gpu", ATMOE_DEVICE_TYPE_GPU},
                 {"cpu", ATMOE_DEVICE_TYPE_CPU},
                 {"accelerator", ATMOE_DEVICE_TYPE_ACCELERATOR}};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++)
        if (strcasecmp(sel, types[t].word) == 0) {
            if (first_of_type(types[t].type, index))
                return ATMOE_STATUS_OK;
            return atm_fail(NULL, ATMOE_STATUS_DEVICE_NOT_FOUND,
                            "no %s device found%s", types[t].word, origin);
        }

    int name_only = strncmp(sel, "name:", 5) == 0;
    const char *text = name_only ? sel + 5 : sel;
    for (i = 0; i < device_count; i++) {
        const atmoe_device_info *info = &devices[i].info;
        if (contains_nocase(info->raw_name, text) ||
            (!name_only && (contains_nocase(info->vendor_name, text) ||
                            contains_nocase(info->platform_name, text) ||
                            contains_nocase(atmoe_vendor_name(info->vendor),
                                            text)))) {
            *index = i;
            return ATMOE_STATUS_OK;
        }
    }
    return atm_fail(NULL, ATMOE_STATUS_DEVICE_NOT_FOUND,
                    "no device matches '%s'%s (%zu device%s found; "
                    "'atmoe devices' lists them)",
                    sel, origin, device_count, device_count == 1 ? "" : "s");
}

ATMOE_API atmoe_status atmoe_device_find(const char *selection, size_t *index)
{
    ATM_CHECK_NULL(NULL, selection);
    ATM_CHECK_NULL(NULL, index);
    atmoe_status st = ensure_enumerated();
    if (st != ATMOE_STATUS_OK)
        return st;
    if (*selection == '\0' || strcmp(selection, "default") == 0)
        return atmoe_device_get_default(index);
    return find(selection, index, "");
}

ATMOE_API atmoe_status atmoe_device_get_default(size_t *index)
{
    ATM_CHECK_NULL(NULL, index);
    atmoe_status st = ensure_enumerated();
    if (st != ATMOE_STATUS_OK)
        return st;
    const char *env = atm_env_get(ATM_ENV_DEVICE);
    if (env && *env && strcmp(env, "default") != 0)
        return find(env, index, " (from ATMOE_DEVICE)");
    return pick_default(index);
}

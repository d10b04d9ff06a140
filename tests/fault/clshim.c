/* A test-only OpenCL shim, loaded with LD_PRELOAD in front of the ICD
 * loader: it wraps the entry points libatmoe and CLBlast call, makes the
 * Nth call fail with an error a driver really returns, and counts the
 * objects each creates, retains and releases, to report those never
 * released when the process exits.  tests/test_faults.sh drives it.
 *
 *   CLSHIM_FAIL_AT=N    the Nth wrapped call (releases and retains are
 *                       not counted) fails; 0 or unset: none
 *   CLSHIM_PERSIST=1    every call after the Nth fails too
 *   CLSHIM_REPORT=FILE  at exit a process that made a call appends one
 *                       line: calls=C failed=N:FUNCTION, then each type
 *                       and creator of objects left, e.g.
 *                       leak:program@clblast=3
 *
 * Objects are attributed to the code that called the function, found
 * with dladdr: clblast (libclblast) or atmoe (anything else). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>

enum obj_type { T_CONTEXT, T_QUEUE, T_MEM, T_PROGRAM, T_KERNEL, T_EVENT,
                T_COUNT };
static const char *const type_names[T_COUNT] = {"context", "queue", "mem",
                                                "program", "kernel", "event"};
enum owner { O_ATMOE, O_CLBLAST, O_COUNT };
static const char *const owner_names[O_COUNT] = {"atmoe", "clblast"};

/* Live objects: address -> type, owner and API references. */
#define SLOTS 65536
static struct slot {
    void *obj;
    unsigned char type, owner;
    int refs;
} table[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t calls, fail_at;
static int persist;
static char failed_name[64];
static const char *report_path;

__attribute__((constructor)) static void shim_init(void)
{
    const char *v = getenv("CLSHIM_FAIL_AT");
    fail_at = v ? strtoull(v, NULL, 10) : 0;
    v = getenv("CLSHIM_PERSIST");
    persist = v && *v == '1';
    report_path = getenv("CLSHIM_REPORT");
}

/* CLBlast's calls come from its shared library; every other is the
 * library's (libatmoe, or a test program linking its objects). */
static int owner_of(void *ret)
{
    Dl_info info;
    if (dladdr(ret, &info) != 0 && info.dli_fname &&
        strstr(info.dli_fname, "clblast"))
        return O_CLBLAST;
    return O_ATMOE;
}

static size_t slot_of(void *obj)
{
    uintptr_t h = (uintptr_t)obj;
    h ^= h >> 17;
    h *= 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 48) % SLOTS;
}

static void track_new(void *obj, int type, void *ret)
{
    if (obj == NULL)
        return;
    int owner = owner_of(ret);
    pthread_mutex_lock(&lock);
    size_t i = slot_of(obj);
    for (size_t n = 0; n < SLOTS; n++, i = (i + 1) % SLOTS)
        if (table[i].obj == NULL || table[i].obj == obj) {
            if (table[i].obj == obj) {
                /* A driver reused an address we did not see released. */
                table[i].refs++;
            } else {
                table[i] = (struct slot){obj, (unsigned char)type,
                                         (unsigned char)owner, 1};
            }
            break;
        }
    pthread_mutex_unlock(&lock);
}

/* delta +1 for a retain, -1 for a release. */
static void track_ref(void *obj, int delta)
{
    pthread_mutex_lock(&lock);
    size_t i = slot_of(obj);
    for (size_t n = 0; n < SLOTS && table[i].obj; n++, i = (i + 1) % SLOTS)
        if (table[i].obj == obj) {
            table[i].refs += delta;
            if (table[i].refs <= 0) {
                /* Remove, re-placing the run after it (linear probing). */
                table[i].obj = NULL;
                size_t j = (i + 1) % SLOTS;
                while (table[j].obj) {
                    struct slot s = table[j];
                    table[j].obj = NULL;
                    size_t k = slot_of(s.obj);
                    while (table[k].obj)
                        k = (k + 1) % SLOTS;
                    table[k] = s;
                    j = (j + 1) % SLOTS;
                }
            }
            break;
        }
    pthread_mutex_unlock(&lock);
}

/* Whether this call is the one to fail. */
static int inject(const char *name)
{
    pthread_mutex_lock(&lock);
    uint64_t n = ++calls;
    int fail = fail_at && (n == fail_at || (persist && n > fail_at));
    if (fail && failed_name[0] == '\0')
        snprintf(failed_name, sizeof failed_name, "%s", name);
    pthread_mutex_unlock(&lock);
    return fail;
}

__attribute__((destructor)) static void shim_report(void)
{
    if (report_path == NULL || calls == 0)
        return;
    unsigned counts[T_COUNT][O_COUNT] = {{0}};
    for (size_t i = 0; i < SLOTS; i++)
        if (table[i].obj)
            counts[table[i].type][table[i].owner] += (unsigned)table[i].refs;
    FILE *f = fopen(report_path, "a");
    if (f == NULL)
        return;
    fprintf(f, "calls=%llu failed=%llu:%s", (unsigned long long)calls,
            (unsigned long long)fail_at,
            failed_name[0] ? failed_name : "none");
    for (int t = 0; t < T_COUNT; t++)
        for (int o = 0; o < O_COUNT; o++)
            if (counts[t][o])
                fprintf(f, " leak:%s@%s=%u", type_names[t], owner_names[o],
                        counts[t][o]);
    fputc('\n', f);
    fclose(f);
}

#define REAL(name)                                                           \
    static __typeof__(&name) real;                                           \
    if (real == NULL)                                                        \
        real = (__typeof__(&name))dlsym(RTLD_NEXT, #name)

/* Alternates two realistic errors over N, so a sweep sees both. */
#define EITHER(a, b) (fail_at % 2 ? (a) : (b))

/* -------------------------------------------------- queries and set-up */

#define QUERY(name, params, args, error)                                     \
    CL_API_ENTRY cl_int CL_API_CALL name params                              \
    {                                                                        \
        REAL(name);                                                          \
        if (inject(#name))                                                   \
            return error;                                                    \
        return real args;                                                    \
    }

QUERY(clGetPlatformIDs,
      (cl_uint n, cl_platform_id *p, cl_uint *np), (n, p, np),
      CL_OUT_OF_HOST_MEMORY)
QUERY(clGetPlatformInfo,
      (cl_platform_id p, cl_platform_info i, size_t s, void *v, size_t *r),
      (p, i, s, v, r), CL_OUT_OF_HOST_MEMORY)
QUERY(clGetDeviceIDs,
      (cl_platform_id p, cl_device_type t, cl_uint n, cl_device_id *d,
       cl_uint *nd),
      (p, t, n, d, nd), CL_OUT_OF_RESOURCES)
QUERY(clGetDeviceInfo,
      (cl_device_id d, cl_device_info i, size_t s, void *v, size_t *r),
      (d, i, s, v, r), EITHER(CL_OUT_OF_RESOURCES, CL_OUT_OF_HOST_MEMORY))
QUERY(clGetCommandQueueInfo,
      (cl_command_queue q, cl_command_queue_info i, size_t s, void *v,
       size_t *r),
      (q, i, s, v, r), CL_OUT_OF_HOST_MEMORY)
QUERY(clGetMemObjectInfo,
      (cl_mem m, cl_mem_info i, size_t s, void *v, size_t *r),
      (m, i, s, v, r), CL_OUT_OF_HOST_MEMORY)
QUERY(clGetProgramInfo,
      (cl_program p, cl_program_info i, size_t s, void *v, size_t *r),
      (p, i, s, v, r), CL_OUT_OF_HOST_MEMORY)
QUERY(clGetProgramBuildInfo,
      (cl_program p, cl_device_id d, cl_program_build_info i, size_t s,
       void *v, size_t *r),
      (p, d, i, s, v, r), CL_OUT_OF_HOST_MEMORY)
QUERY(clGetKernelWorkGroupInfo,
      (cl_kernel k, cl_device_id d, cl_kernel_work_group_info i, size_t s,
       void *v, size_t *r),
      (k, d, i, s, v, r), CL_OUT_OF_RESOURCES)
QUERY(clGetEventProfilingInfo,
      (cl_event e, cl_profiling_info i, size_t s, void *v, size_t *r),
      (e, i, s, v, r), CL_PROFILING_INFO_NOT_AVAILABLE)
QUERY(clSetKernelArg,
      (cl_kernel k, cl_uint i, size_t s, const void *v), (k, i, s, v),
      CL_OUT_OF_RESOURCES)
QUERY(clBuildProgram,
      (cl_program p, cl_uint n, const cl_device_id *d, const char *o,
       void(CL_CALLBACK *cb)(cl_program, void *), void *u),
      (p, n, d, o, cb, u), EITHER(CL_BUILD_PROGRAM_FAILURE,
                                  CL_OUT_OF_HOST_MEMORY))
QUERY(clFinish, (cl_command_queue q), (q), CL_OUT_OF_RESOURCES)
QUERY(clFlush, (cl_command_queue q), (q), CL_OUT_OF_RESOURCES)
QUERY(clWaitForEvents, (cl_uint n, const cl_event *e), (n, e),
      CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST)

/* ------------------------------------------------------------ creation */

CL_API_ENTRY cl_context CL_API_CALL
clCreateContext(const cl_context_properties *p, cl_uint n,
                const cl_device_id *d,
                void(CL_CALLBACK *cb)(const char *, const void *, size_t,
                                      void *),
                void *u, cl_int *err)
{
    REAL(clCreateContext);
    if (inject("clCreateContext")) {
        if (err)
            *err = EITHER(CL_OUT_OF_HOST_MEMORY, CL_OUT_OF_RESOURCES);
        return NULL;
    }
    cl_context c = real(p, n, d, cb, u, err);
    track_new(c, T_CONTEXT, __builtin_return_address(0));
    return c;
}

CL_API_ENTRY cl_command_queue CL_API_CALL
clCreateCommandQueue(cl_context c, cl_device_id d,
                     cl_command_queue_properties p, cl_int *err)
{
    REAL(clCreateCommandQueue);
    if (inject("clCreateCommandQueue")) {
        if (err)
            *err = CL_OUT_OF_RESOURCES;
        return NULL;
    }
    cl_command_queue q = real(c, d, p, err);
    track_new(q, T_QUEUE, __builtin_return_address(0));
    return q;
}

CL_API_ENTRY cl_mem CL_API_CALL clCreateBuffer(cl_context c, cl_mem_flags f,
                                               size_t s, void *h, cl_int *err)
{
    REAL(clCreateBuffer);
    if (inject("clCreateBuffer")) {
        if (err)
            *err = EITHER(CL_MEM_OBJECT_ALLOCATION_FAILURE,
                          CL_OUT_OF_RESOURCES);
        return NULL;
    }
    cl_mem m = real(c, f, s, h, err);
    track_new(m, T_MEM, __builtin_return_address(0));
    return m;
}

CL_API_ENTRY cl_program CL_API_CALL
clCreateProgramWithSource(cl_context c, cl_uint n, const char **s,
                          const size_t *l, cl_int *err)
{
    REAL(clCreateProgramWithSource);
    if (inject("clCreateProgramWithSource")) {
        if (err)
            *err = CL_OUT_OF_HOST_MEMORY;
        return NULL;
    }
    cl_program p = real(c, n, s, l, err);
    track_new(p, T_PROGRAM, __builtin_return_address(0));
    return p;
}

CL_API_ENTRY cl_program CL_API_CALL
clCreateProgramWithBinary(cl_context c, cl_uint n, const cl_device_id *d,
                          const size_t *l, const unsigned char **b,
                          cl_int *status, cl_int *err)
{
    REAL(clCreateProgramWithBinary);
    if (inject("clCreateProgramWithBinary")) {
        if (err)
            *err = EITHER(CL_INVALID_BINARY, CL_OUT_OF_HOST_MEMORY);
        return NULL;
    }
    cl_program p = real(c, n, d, l, b, status, err);
    track_new(p, T_PROGRAM, __builtin_return_address(0));
    return p;
}

CL_API_ENTRY cl_kernel CL_API_CALL clCreateKernel(cl_program p,
                                                  const char *name,
                                                  cl_int *err)
{
    REAL(clCreateKernel);
    if (inject("clCreateKernel")) {
        if (err)
            *err = CL_OUT_OF_RESOURCES;
        return NULL;
    }
    cl_kernel k = real(p, name, err);
    track_new(k, T_KERNEL, __builtin_return_address(0));
    return k;
}

/* ------------------------------------------------------------ commands */

/* An enqueue: fails before the driver sees it, or records the event it
 * returns. */
#define ENQUEUE(name, params, args)                                          \
    CL_API_ENTRY cl_int CL_API_CALL name params                              \
    {                                                                        \
        REAL(name);                                                          \
        if (inject(#name))                                                   \
            return EITHER(CL_OUT_OF_RESOURCES, CL_INVALID_OPERATION);        \
        cl_int rc = real args;                                               \
        if (rc == CL_SUCCESS && ev)                                          \
            track_new(*ev, T_EVENT, __builtin_return_address(0));            \
        return rc;                                                           \
    }

ENQUEUE(clEnqueueNDRangeKernel,
        (cl_command_queue q, cl_kernel k, cl_uint d, const size_t *o,
         const size_t *g, const size_t *l, cl_uint nw, const cl_event *w,
         cl_event *ev),
        (q, k, d, o, g, l, nw, w, ev))
ENQUEUE(clEnqueueReadBuffer,
        (cl_command_queue q, cl_mem m, cl_bool b, size_t o, size_t s, void *p,
         cl_uint nw, const cl_event *w, cl_event *ev),
        (q, m, b, o, s, p, nw, w, ev))
ENQUEUE(clEnqueueWriteBuffer,
        (cl_command_queue q, cl_mem m, cl_bool b, size_t o, size_t s,
         const void *p, cl_uint nw, const cl_event *w, cl_event *ev),
        (q, m, b, o, s, p, nw, w, ev))
ENQUEUE(clEnqueueReadBufferRect,
        (cl_command_queue q, cl_mem m, cl_bool b, const size_t *bo,
         const size_t *ho, const size_t *r, size_t brp, size_t bsp,
         size_t hrp, size_t hsp, void *p, cl_uint nw, const cl_event *w,
         cl_event *ev),
        (q, m, b, bo, ho, r, brp, bsp, hrp, hsp, p, nw, w, ev))
ENQUEUE(clEnqueueWriteBufferRect,
        (cl_command_queue q, cl_mem m, cl_bool b, const size_t *bo,
         const size_t *ho, const size_t *r, size_t brp, size_t bsp,
         size_t hrp, size_t hsp, const void *p, cl_uint nw,
         const cl_event *w, cl_event *ev),
        (q, m, b, bo, ho, r, brp, bsp, hrp, hsp, p, nw, w, ev))
ENQUEUE(clEnqueueCopyBuffer,
        (cl_command_queue q, cl_mem s, cl_mem d, size_t so, size_t dof,
         size_t n, cl_uint nw, const cl_event *w, cl_event *ev),
        (q, s, d, so, dof, n, nw, w, ev))
ENQUEUE(clEnqueueMarkerWithWaitList,
        (cl_command_queue q, cl_uint nw, const cl_event *w, cl_event *ev),
        (q, nw, w, ev))

/* ------------------------------------------------ retains and releases */

#define REF(name, type, delta)                                               \
    CL_API_ENTRY cl_int CL_API_CALL name(type o)                             \
    {                                                                        \
        REAL(name);                                                          \
        cl_int rc = real(o);                                                 \
        if (rc == CL_SUCCESS)                                                \
            track_ref(o, delta);                                             \
        return rc;                                                           \
    }

REF(clRetainContext, cl_context, +1)
REF(clReleaseContext, cl_context, -1)
REF(clRetainCommandQueue, cl_command_queue, +1)
REF(clReleaseCommandQueue, cl_command_queue, -1)
REF(clRetainMemObject, cl_mem, +1)
REF(clReleaseMemObject, cl_mem, -1)
REF(clRetainProgram, cl_program, +1)
REF(clReleaseProgram, cl_program, -1)
REF(clRetainKernel, cl_kernel, +1)
REF(clReleaseKernel, cl_kernel, -1)
REF(clRetainEvent, cl_event, +1)
REF(clReleaseEvent, cl_event, -1)

/*
 * atmoe: mixtures of LoRA experts on any OpenCL device.
 *
 * This is the library's only public header.  Every object is an opaque
 * handle created by an atmoe_<object>_new() (or similar) function and released
 * by the matching atmoe_<object>_free(); every function that can fail returns
 * an atmoe_status, and the detail of the last failure is available from
 * atmoe_errmsg().
 *
 * Thread safety:
 *  - The device list, atmoe_strerror(), atmoe_status_name() and
 *    atmoe_log_set() may be used from any thread at any time.
 *  - Several contexts may exist at once and may be used from different threads
 *    concurrently.  One context, and every tensor created from it, must be used
 *    by one thread at a time: the caller serialises access to a context.
 *  - Error messages of calls made without a context are kept per thread.
 *
 * Ownership: a function that returns a handle through an out pointer gives
 * the caller one reference, released with the matching _free().  A tensor
 * view keeps the storage of its parent alive, so a parent may be freed
 * before its views.  A context must outlive every tensor created from it.
 *
 * ABI: the library follows libtool's -version-info rules and exports the
 * atmoe_ symbols declared here and nothing else.  Public structs
 * (atmoe_device_info, atmoe_cache_stats) change only with the major version.
 */
#ifndef ATMOE_H
#define ATMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) && defined(ATMOE_BUILDING_LIBRARY)
#define ATMOE_API __attribute__((visibility("default")))
#else
#define ATMOE_API
#endif

#define ATMOE_VERSION_MAJOR 0
#define ATMOE_VERSION_MINOR 2
#define ATMOE_VERSION_PATCH 0

/* Returns the version of the library that is linked, as "MAJOR.MINOR.PATCH". */
ATMOE_API const char *atmoe_version(void);

/* ------------------------------------------------------------------------ */
/* Status codes                                                              */
/* ------------------------------------------------------------------------ */

/* X(name, description): the one list behind the enum, atmoe_strerror() and
 * atmoe_status_name().  New codes are appended, never renumbered. */
#define ATMOE_STATUS_MAP(X)                                                   \
    X(OK, "success")                                                          \
    X(INVALID_ARGUMENT, "invalid argument")                                   \
    X(NULL_POINTER, "a required pointer argument is NULL")                    \
    X(SHAPE_MISMATCH, "tensor shapes do not agree")                           \
    X(DTYPE_MISMATCH, "tensor data type is not supported here")               \
    X(OUT_OF_RANGE, "an index or size is out of range")                       \
    X(HOST_OUT_OF_MEMORY, "host memory allocation failed")                    \
    X(DEVICE_OUT_OF_MEMORY, "device memory allocation failed")                \
    X(NO_DEVICE, "no OpenCL device is available")                             \
    X(DEVICE_NOT_FOUND, "no OpenCL device matches the selection")             \
    X(OPENCL_ERROR, "an OpenCL call failed")                                  \
    X(BUILD_FAILED, "an OpenCL program failed to build")                      \
    X(BLAS_ERROR, "a CLBlast call failed")                                    \
    X(IO_ERROR, "a file could not be read or written")                        \
    X(FORMAT_ERROR, "a file or string is malformed")                          \
    X(NOT_SUPPORTED, "not supported by this device or by the library")       \
    X(WRONG_CONTEXT, "objects belong to different contexts")                  \
    X(NUMERIC_ERROR, "a result differs from its reference")                \
    X(NOT_FOUND, "no tensor, key or file of that name")                       \
    X(NOT_FINITE, "a loss or gradient is NaN or infinite")                    \
    X(CANCELLED, "stopped at the caller's request")                          \
    X(NO_PROGRESS, "training did not lower the loss")

typedef enum atmoe_status {
#define ATMOE_STATUS_ENUM_(name, text) ATMOE_STATUS_##name,
    ATMOE_STATUS_MAP(ATMOE_STATUS_ENUM_)
#undef ATMOE_STATUS_ENUM_
    ATMOE_STATUS_COUNT_
} atmoe_status;

/* A short English description of a status ("device memory allocation
 * failed"); "unknown" for a value outside the list, as every name function
 * of this header answers for a value outside its enum. */
ATMOE_API const char *atmoe_strerror(atmoe_status status);

/* The status's name without the prefix ("DEVICE_OUT_OF_MEMORY"). */
ATMOE_API const char *atmoe_status_name(atmoe_status status);

typedef struct atmoe_context atmoe_context;
typedef struct atmoe_tensor atmoe_tensor;

/* The detail of the last failed call on ctx: which argument, which shape,
 * the OpenCL error name, the program build log.  With ctx NULL, the detail
 * of the last failed call made on this thread without a context (device
 * enumeration, atmoe_context_new, any call whose context, tensor or graph
 * argument was NULL).  Never NULL; "" when nothing has failed; a success
 * does not clear it.
 * The string stays valid until the next call on the same context (or thread). */
ATMOE_API const char *atmoe_errmsg(const atmoe_context *ctx);

/* ------------------------------------------------------------------------ */
/* Logging                                                                   */
/* ------------------------------------------------------------------------ */

typedef enum atmoe_log_level {
    ATMOE_LOG_DEBUG,
    ATMOE_LOG_INFO,
    ATMOE_LOG_WARNING,
    ATMOE_LOG_ERROR
} atmoe_log_level;

typedef void (*atmoe_log_fn)(atmoe_log_level level, const char *message,
                             void *user);

/* The library never writes to stdout or stderr.  Messages at min_level and
 * above go to fn (which may be called from any thread that uses the library,
 * and must not call back into it); fn NULL switches logging off, the
 * default.  A message being delivered while the callback is replaced may
 * still reach the old callback once. */
ATMOE_API atmoe_status atmoe_log_set(atmoe_log_fn fn, void *user,
                                     atmoe_log_level min_level);

/* ------------------------------------------------------------------------ */
/* Devices                                                                   */
/* ------------------------------------------------------------------------ */

typedef enum atmoe_vendor {
    ATMOE_VENDOR_OTHER,
    ATMOE_VENDOR_AMD,
    ATMOE_VENDOR_INTEL,
    ATMOE_VENDOR_NVIDIA,
    ATMOE_VENDOR_POCL /* PoCL's CPU device and other PoCL drivers */
} atmoe_vendor;

typedef enum atmoe_device_type {
    ATMOE_DEVICE_TYPE_OTHER,
    ATMOE_DEVICE_TYPE_CPU,
    ATMOE_DEVICE_TYPE_GPU,
    ATMOE_DEVICE_TYPE_ACCELERATOR
} atmoe_device_type;

typedef struct atmoe_device_info {
    size_t index;               /* position in the library's device list */
    char name[256];             /* normalised: PoCL's "pthread-" dropped */
    char raw_name[256];         /* CL_DEVICE_NAME as the driver reports it */
    char vendor_name[256];      /* CL_DEVICE_VENDOR */
    char platform_name[256];    /* CL_PLATFORM_NAME */
    char platform_version[256]; /* CL_PLATFORM_VERSION */
    char driver_version[128];   /* CL_DRIVER_VERSION */
    atmoe_vendor vendor;
    atmoe_device_type type;
    unsigned compute_units;
    uint64_t global_mem_bytes;
    uint64_t max_alloc_bytes;
    uint64_t local_mem_bytes;
    size_t max_work_group_size;
    int fp16; /* cl_khr_fp16 arithmetic (fp16 storage works everywhere) */
    int fp64; /* cl_khr_fp64 */
} atmoe_device_info;

/* Names for the enums: "AMD", "Intel", "NVIDIA", "PoCL", "other";
 * "CPU", "GPU", "accelerator", "other"; "unknown" outside the enums. */
ATMOE_API const char *atmoe_vendor_name(atmoe_vendor vendor);
ATMOE_API const char *atmoe_device_type_name(atmoe_device_type type);

/* Number of OpenCL devices over every platform.  *count is 0 (and the status
 * OK) when the ICD loader finds no platform. */
ATMOE_API atmoe_status atmoe_device_get_count(size_t *count);

/* Describes device number index (0 <= index < atmoe_device_get_count()). */
ATMOE_API atmoe_status atmoe_device_get_info(size_t index,
                                             atmoe_device_info *info);

/* Finds the device a selection string names:
 *   "default" or ""  the default device (see atmoe_device_get_default)
 *   "0", "1", ...    a position in the device list
 *   "gpu", "cpu", "accelerator"   the first device of that type
 *   "name:TEXT"      the first device whose name (as the driver reports
 *                    it, CL_DEVICE_NAME) contains TEXT
 *   anything else    the first device whose name, vendor or platform
 *                    contains it, or the vendor's class name ("PoCL",
 *                    "NVIDIA", ...), case-insensitively
 * ATMOE_STATUS_DEVICE_NOT_FOUND when nothing matches, ATMOE_STATUS_NO_DEVICE
 * when there is no device at all. */
ATMOE_API atmoe_status atmoe_device_find(const char *selection,
                                         size_t *index);

/* The default device: the one ATMOE_DEVICE names when that variable is set
 * (a selection string as above; a selection that matches nothing is an
 * error, not a silent fallback), else the first GPU, else the first CPU,
 * else the first device. */
ATMOE_API atmoe_status atmoe_device_get_default(size_t *index);

/* ------------------------------------------------------------------------ */
/* Contexts                                                                  */
/* ------------------------------------------------------------------------ */

/* Creates a context on the device a selection string names (NULL means
 * "default"): an OpenCL context, an in-order profiling queue, a program
 * cache in memory and on disk.  The disk cache lives in ATMOE_CACHE_DIR
 * (set but empty: no disk cache), else $XDG_CACHE_HOME/atmoe (when that is
 * an absolute path), else $HOME/.cache/atmoe; a directory that cannot be
 * used turns the disk cache off (logged), it is not an error. */
ATMOE_API atmoe_status atmoe_context_new(const char *device,
                                         atmoe_context **ctx);

/* Releases the context and every OpenCL object it holds.  NULL is a no-op. */
ATMOE_API void atmoe_context_free(atmoe_context *ctx);

ATMOE_API atmoe_status atmoe_context_get_device(const atmoe_context *ctx,
                                                atmoe_device_info *info);

/* Uses dir for the on-disk program cache from now on; NULL switches the
 * disk cache off.  An unusable directory switches it off too, and the call
 * returns ATMOE_STATUS_IO_ERROR saying why (the context stays usable). */
ATMOE_API atmoe_status atmoe_context_set_cache_dir(atmoe_context *ctx,
                                                   const char *dir);

/* Waits until every command enqueued on the context has completed. */
ATMOE_API atmoe_status atmoe_context_finish(atmoe_context *ctx);

typedef struct atmoe_cache_stats {
    uint64_t memory_hits;   /* programs found already built in this context */
    uint64_t disk_hits;     /* programs loaded from a cached binary */
    uint64_t builds;        /* programs compiled from source */
    uint64_t disk_writes;   /* binaries stored in the disk cache */
    uint64_t disk_rejected; /* cache files found corrupt or foreign */
    int disk_enabled;       /* whether the disk cache is in use */
    char dir[512];          /* the disk cache directory ("" when off) */
} atmoe_cache_stats;

ATMOE_API atmoe_status atmoe_context_get_cache_stats(const atmoe_context *ctx,
                                                     atmoe_cache_stats *stats);

typedef struct atmoe_memory_stats {
    uint64_t allocations;     /* device buffers the context has created */
    uint64_t allocated_bytes; /* their total size */
} atmoe_memory_stats;

/* Counts the device allocations made through the context (tensors, graph
 * arenas) since it was created; the counts only grow.  A caller can check
 * that a loop allocates nothing.  CLBlast's own temporary buffers are not
 * counted. */
ATMOE_API atmoe_status atmoe_context_get_memory_stats(
    const atmoe_context *ctx, atmoe_memory_stats *stats);

/* Runs the library's own kernels and a CLBlast GEMM on the context's device
 * on random data and compares them with a float64 host reference.
 * ATMOE_STATUS_NUMERIC_ERROR (with the worst element in atmoe_errmsg) when a
 * result is off; *max_rel_err (may be NULL) receives the largest relative
 * error seen. */
ATMOE_API atmoe_status atmoe_context_selfcheck(atmoe_context *ctx,
                                               double *max_rel_err);

/* ------------------------------------------------------------------------ */
/* Tuning                                                                    */
/* ------------------------------------------------------------------------ */

/* Kernel parameters are data.  A tuning database (JSON, described in
 * atmoe-tune(1), which writes it) holds entries keyed by device name,
 * vendor, type and driver version, each with parameter sets for CLBlast's
 * GEMM kernels and defines for the library's own programs.  Two copies are
 * read: the system one installed with the library (ATMOE_TUNING_SYSTEM_FILE
 * names another; set but empty: none) and the user's (see
 * atmoe_tuning_get_user_path), whose entries replace the system entries of the
 * same key.  For each kernel the most specific matching entry wins: device
 * and driver, then the device under any driver, then vendor and type.
 * atmoe_context_new() applies it unless the environment variable
 * ATMOE_PARAMS is "default".  A database that cannot be read is logged as a
 * warning and ignored.
 *
 * CLBlast keeps its parameters per OpenCL device for the whole process: a
 * set applied through one context holds for every context on that device,
 * now and later, and CLBlast has no way back to its built-in values. */

/* Chooses the parameters of ctx:
 *   "tuned"    read the databases again and apply the device's entry
 *   "default"  CLBlast's built-in parameters and no tuned defines
 *              (ATMOE_STATUS_NOT_SUPPORTED once a CLBlast set has been
 *              applied to the device in this process)
 *   "{...}"    an explicit set: a JSON object with "clblast" and "kernels"
 *              sections as in a database entry, checked like one
 *              (ATMOE_STATUS_FORMAT_ERROR), and refused whole when the
 *              device cannot run it (ATMOE_STATUS_NOT_SUPPORTED)
 * CLBlast kernels that the set does not list keep their parameters.
 * Programs of the library built before the call keep theirs; the next use
 * builds them with the new defines. */
ATMOE_API atmoe_status atmoe_context_set_params(atmoe_context *ctx,
                                                const char *params);

/* Describes the parameters in force as a JSON object: "mode" ("tuned",
 * "default" or "custom"), "clblast" (kernel -> match, file, params: what
 * CLBlast uses on the device, whichever context applied it) and "kernels"
 * (program -> match, file, defines).  Writes it NUL-terminated to json;
 * ATMOE_STATUS_OUT_OF_RANGE when it needs more than size bytes.  *needed
 * (may be NULL) receives the size it needs. */
ATMOE_API atmoe_status atmoe_context_get_params(const atmoe_context *ctx,
                                                char *json, size_t size,
                                                size_t *needed);

/* The path of the user's tuning database: $ATMOE_TUNING_FILE, else
 * $XDG_DATA_HOME/atmoe/tuning.json (for an absolute XDG_DATA_HOME), else
 * $HOME/.local/share/atmoe/tuning.json.  ATMOE_STATUS_NOT_FOUND when there
 * is none (ATMOE_TUNING_FILE set but empty, or no HOME). */
ATMOE_API atmoe_status atmoe_tuning_get_user_path(char *path, size_t size);

/* Checks that path holds a tuning database the library accepts:
 * ATMOE_STATUS_IO_ERROR when it cannot be read, ATMOE_STATUS_FORMAT_ERROR
 * with the entry and field at fault in atmoe_errmsg(NULL).  *entries (may
 * be NULL) receives the number of entries. */
ATMOE_API atmoe_status atmoe_tuning_check(const char *path, size_t *entries);

/* Stores params (a JSON object as for atmoe_context_set_params, with an
 * optional free-form "info" object) as the entry of device -- keyed by its
 * name, vendor, type and driver version -- in the database at path (NULL:
 * the user's), replacing the entry of the same key and keeping the others.
 * Missing directories are created; the file is replaced atomically.  An
 * existing file that is not a valid database is left alone
 * (ATMOE_STATUS_FORMAT_ERROR). */
ATMOE_API atmoe_status atmoe_tuning_save(const char *path,
                                         const atmoe_device_info *device,
                                         const char *params);

/* ------------------------------------------------------------------------ */
/* Tensors                                                                   */
/* ------------------------------------------------------------------------ */

#define ATMOE_MAX_DIMS 4

typedef enum atmoe_dtype {
    ATMOE_DTYPE_F32,
    ATMOE_DTYPE_F16, /* storage only: arithmetic is always at least fp32 */
    ATMOE_DTYPE_I32,
    ATMOE_DTYPE_BF16, /* storage only: the upper half of an f32 */
    ATMOE_DTYPE_Q8    /* storage only, base weights: blocks of 8-bit values
                         (see "8-bit blocks" below) */
} atmoe_dtype;

/* "f32", "f16", "i32", "bf16", "q8"; "unknown" for a value outside the
 * enum. */
ATMOE_API const char *atmoe_dtype_name(atmoe_dtype dtype);
/* Bytes per element; 0 for a value outside the enum, and 0 for q8, whose
 * elements are not a whole number of bytes each: atmoe_tensor_get_bytes
 * gives any tensor's size. */
ATMOE_API size_t atmoe_dtype_size(atmoe_dtype dtype);

/* 8-bit blocks (ATMOE_DTYPE_Q8), the layout of llama.cpp's Q8_0 with an
 * f32 scale: each row (the last dimension, d_in of a weight) is cut into
 * blocks of ATMOE_Q8_BLOCK values, and a block is stored as its f32 scale
 * d (little-endian) followed by ATMOE_Q8_BLOCK int8 values q; the value of
 * element j is q[j] * d.  A row whose length is not a multiple of the
 * block is padded to whole blocks with q = 0, so a row of n elements takes
 * ceil(n / 32) * 36 bytes.  The scale is f32 rather than f16 so that a
 * block stays 4-byte aligned for the kernels' loads (36 bytes, 1.125 bytes
 * an element against 1.0625).  Quantisation (atmoe_tensor_copy into a q8
 * tensor) takes d = max|x| / 127 over the block and q = x / d rounded to
 * nearest, ties away from zero (0 for a block of zeros); a block with a
 * NaN or infinite element gets a NaN scale, so it never reads as finite.
 *
 * A q8 tensor is a weight: it is written and read as raw blocks
 * (atmoe_tensor_write/read with atmoe_tensor_get_bytes bytes), converted
 * from and to f32, f16 and bf16 by atmoe_tensor_copy, and read as W0 by
 * atmoe_graph_mixture; it has no views (but the whole of it), reshapes
 * or fills, and graph
 * inputs, constants and element-wise operations refuse it
 * (ATMOE_STATUS_DTYPE_MISMATCH). */
#define ATMOE_Q8_BLOCK 32
#define ATMOE_Q8_BLOCK_BYTES 36

/* A new dense row-major tensor of ndim (1..ATMOE_MAX_DIMS) dimensions, in
 * device memory, contents undefined.  Every dimension must be at least 1.
 * ATMOE_STATUS_DEVICE_OUT_OF_MEMORY when the device cannot hold it. */
ATMOE_API atmoe_status atmoe_tensor_new(atmoe_context *ctx, atmoe_dtype dtype,
                                        int ndim, const size_t *shape,
                                        atmoe_tensor **tensor);

/* A view of the block of parent that starts at start[] and spans shape[],
 * both of parent's rank.  It shares parent's storage and strides, so a view
 * of a view is fine, and writing through a view changes the parent. */
ATMOE_API atmoe_status atmoe_tensor_view(atmoe_tensor *parent,
                                         const size_t *start,
                                         const size_t *shape,
                                         atmoe_tensor **view);

/* A view of a contiguous tensor with another shape of the same number of
 * elements (ATMOE_STATUS_INVALID_ARGUMENT for a non-contiguous view). */
ATMOE_API atmoe_status atmoe_tensor_reshape(atmoe_tensor *tensor, int ndim,
                                            const size_t *shape,
                                            atmoe_tensor **view);

/* Releases a tensor or view.  NULL is a no-op. */
ATMOE_API void atmoe_tensor_free(atmoe_tensor *tensor);

ATMOE_API atmoe_status atmoe_tensor_get_shape(const atmoe_tensor *tensor,
                                              int *ndim, size_t *shape);
ATMOE_API atmoe_status atmoe_tensor_get_dtype(const atmoe_tensor *tensor,
                                              atmoe_dtype *dtype);
/* Number of elements. */
ATMOE_API atmoe_status atmoe_tensor_get_count(const atmoe_tensor *tensor,
                                              size_t *count);
/* Bytes that atmoe_tensor_write and atmoe_tensor_read move: count x dtype
 * size, and for q8 the rows' whole blocks (see "8-bit blocks"). */
ATMOE_API atmoe_status atmoe_tensor_get_bytes(const atmoe_tensor *tensor,
                                              size_t *bytes);

/* Copies host memory into the tensor (or view).  src holds the tensor's
 * elements densely in row-major order in the tensor's dtype; bytes must
 * equal atmoe_tensor_get_bytes (q8: the raw blocks).  Blocks until the
 * data is on the device. */
ATMOE_API atmoe_status atmoe_tensor_write(atmoe_tensor *tensor,
                                          const void *src, size_t bytes);

/* Copies the tensor (or view) into dense row-major host memory; waits for
 * every command enqueued before it. */
ATMOE_API atmoe_status atmoe_tensor_read(const atmoe_tensor *tensor,
                                         void *dst, size_t bytes);

/* Sets every element to value: for f32 rounded to a float, for f16 rounded
 * to a float and then to the nearest half, for i32 truncated toward zero
 * (ATMOE_STATUS_INVALID_ARGUMENT for NaN, ATMOE_STATUS_OUT_OF_RANGE outside
 * the int32 range). */
ATMOE_API atmoe_status atmoe_tensor_fill(atmoe_tensor *tensor, double value);

/* dst = src, element by element, for tensors (or views) of the same shape;
 * converts between f32 and f16 (round to nearest even); quantises f32, f16
 * and bf16 into a q8 dst and dequantises a q8 src into f32, f16 or bf16
 * (see "8-bit blocks"; q8 into q8 is refused).  dst and src must
 * not overlap (two views of one tensor may).  Runs on the device; does not
 * wait. */
ATMOE_API atmoe_status atmoe_tensor_copy(atmoe_tensor *dst,
                                         const atmoe_tensor *src);

/* ------------------------------------------------------------------------ */
/* Compute graphs                                                            */
/* ------------------------------------------------------------------------ */

/* A graph is built as metadata (inputs, parameters, constants, operations),
 * planned once (an order, the liveness of every intermediate, one device
 * arena in which intermediates share memory), then computed many times with
 * no allocation.  A node is named by an atmoe_node, its position in the
 * graph; ATMOE_NODE_NONE stands for an absent optional operand.
 *
 * Shapes are inferred when a node is added; a mismatch fails there, with the
 * operation, the operand and both shapes in atmoe_errmsg().  Inputs may be
 * declared batched: their first dimension is the largest batch the plan
 * holds, and atmoe_graph_compute() may run any smaller batch without
 * planning again.  Nodes derived from a batched input are batched along the
 * same dimension.
 *
 * A graph belongs to its context and, like it, is used by one thread at a
 * time.  Adding nodes after planning discards the plan. */
typedef int atmoe_node;
#define ATMOE_NODE_NONE (-1)

typedef struct atmoe_graph atmoe_graph;

ATMOE_API atmoe_status atmoe_graph_new(atmoe_context *ctx, atmoe_graph **graph);
/* Releases the graph, its arena and its constants.  NULL is a no-op. */
ATMOE_API void atmoe_graph_free(atmoe_graph *graph);

/* An input that atmoe_graph_set_input() fills before each compute.  With
 * batched non-zero, shape[0] is the largest batch. */
ATMOE_API atmoe_status atmoe_graph_input(atmoe_graph *graph, const char *name,
                                         atmoe_dtype dtype, int ndim,
                                         const size_t *shape, int batched,
                                         atmoe_node *node);
/* A parameter: a tensor of the caller's that persists between computes
 * (weights).  The graph keeps the tensor's storage alive; the caller may
 * update its contents between computes, and may free its handle. */
ATMOE_API atmoe_status atmoe_graph_parameter(atmoe_graph *graph,
                                             const char *name,
                                             atmoe_tensor *tensor,
                                             atmoe_node *node);
/* A constant: data copied to the device now, owned by the graph. */
ATMOE_API atmoe_status atmoe_graph_constant(atmoe_graph *graph,
                                            const char *name,
                                            atmoe_dtype dtype, int ndim,
                                            const size_t *shape,
                                            const void *data,
                                            atmoe_node *node);

/* Flags of atmoe_graph_matmul. */
#define ATMOE_MATMUL_TRANSPOSE_A 1u
#define ATMOE_MATMUL_TRANSPOSE_B 2u

/* out = op(a) op(b) (+ bias broadcast over rows), through CLBlast, for
 * 2-D f32 a and b; bias is a 1-D node of op(b)'s column count or
 * ATMOE_NODE_NONE.  A linear layer y = x W^T + b is
 * matmul(x, W, b, ATMOE_MATMUL_TRANSPOSE_B). */
ATMOE_API atmoe_status atmoe_graph_matmul(atmoe_graph *graph, atmoe_node a,
                                          atmoe_node b, atmoe_node bias,
                                          unsigned flags, atmoe_node *out);

/* Element-wise a + b and a * b with numpy's broadcasting: shapes are
 * aligned on the right, and a dimension of 1 (or a missing one) stretches
 * to the other operand's.  Operations that compute take f32 operands;
 * atmoe_graph_cast converts f16 storage first. */
ATMOE_API atmoe_status atmoe_graph_add(atmoe_graph *graph, atmoe_node a,
                                       atmoe_node b, atmoe_node *out);
ATMOE_API atmoe_status atmoe_graph_mul(atmoe_graph *graph, atmoe_node a,
                                       atmoe_node b, atmoe_node *out);
/* out = alpha * x. */
ATMOE_API atmoe_status atmoe_graph_scale(atmoe_graph *graph, atmoe_node x,
                                         float alpha, atmoe_node *out);
ATMOE_API atmoe_status atmoe_graph_silu(atmoe_graph *graph, atmoe_node x,
                                        atmoe_node *out);
/* GELU, the exact form x * Phi(x), computed as x/2 * erfc(-x/sqrt 2) so
 * that it stays accurate for negative x. */
ATMOE_API atmoe_status atmoe_graph_gelu(atmoe_graph *graph, atmoe_node x,
                                        atmoe_node *out);
ATMOE_API atmoe_status atmoe_graph_sigmoid(atmoe_graph *graph, atmoe_node x,
                                           atmoe_node *out);

/* Numerically stable softmax along dimension dim (negative counts from the
 * end: -1 is the last). */
ATMOE_API atmoe_status atmoe_graph_softmax(atmoe_graph *graph, atmoe_node x,
                                           int dim, atmoe_node *out);
/* The k largest values along dim, in descending order, and their indices
 * (an i32 node); ties keep the lower index first.  Either output pointer
 * may be NULL when not wanted. */
ATMOE_API atmoe_status atmoe_graph_topk(atmoe_graph *graph, atmoe_node x,
                                        int k, int dim, atmoe_node *values,
                                        atmoe_node *indices);
/* RMSNorm and LayerNorm over the last dimension; weight (and bias) are 1-D
 * of that length or ATMOE_NODE_NONE. */
ATMOE_API atmoe_status atmoe_graph_rmsnorm(atmoe_graph *graph, atmoe_node x,
                                           atmoe_node weight, float eps,
                                           atmoe_node *out);
ATMOE_API atmoe_status atmoe_graph_layernorm(atmoe_graph *graph, atmoe_node x,
                                             atmoe_node weight,
                                             atmoe_node bias, float eps,
                                             atmoe_node *out);
/* Mean over dimension dim, which is removed from the shape (mean pooling
 * of a sequence: x [B, S, D], dim 1 -> [B, D]). */
ATMOE_API atmoe_status atmoe_graph_mean(atmoe_graph *graph, atmoe_node x,
                                        int dim, atmoe_node *out);
/* x / max(||x||_2, eps) along dimension dim. */
ATMOE_API atmoe_status atmoe_graph_l2norm(atmoe_graph *graph, atmoe_node x,
                                          int dim, float eps, atmoe_node *out);
/* out[i, ...] = table[indices[i], ...]: rows of a table picked by a 1-D i32
 * index node.  An index outside the table gives a zero row. */
ATMOE_API atmoe_status atmoe_graph_gather_rows(atmoe_graph *graph,
                                               atmoe_node table,
                                               atmoe_node indices,
                                               atmoe_node *out);
/* out = dst with out[indices[i], ...] += src[i, ...] (repeated indices add
 * up; an index outside dst is skipped). */
ATMOE_API atmoe_status atmoe_graph_scatter_add_rows(atmoe_graph *graph,
                                                    atmoe_node dst,
                                                    atmoe_node indices,
                                                    atmoe_node src,
                                                    atmoe_node *out);
/* The same elements in another shape of the same count (no copy). */
ATMOE_API atmoe_status atmoe_graph_reshape(atmoe_graph *graph, atmoe_node x,
                                           int ndim, const size_t *shape,
                                           atmoe_node *out);
/* A copy of the block of x that starts at start[] and spans shape[] (x's
 * rank). */
ATMOE_API atmoe_status atmoe_graph_view(atmoe_graph *graph, atmoe_node x,
                                        const size_t *start,
                                        const size_t *shape, atmoe_node *out);
/* x with dimensions dim0 and dim1 exchanged. */
ATMOE_API atmoe_status atmoe_graph_transpose(atmoe_graph *graph, atmoe_node x,
                                             int dim0, int dim1,
                                             atmoe_node *out);
/* a and b joined along dim; every other dimension must agree. */
ATMOE_API atmoe_status atmoe_graph_concat(atmoe_graph *graph, atmoe_node a,
                                          atmoe_node b, int dim,
                                          atmoe_node *out);
/* x converted to dtype: f32 and f16 into each other (round to nearest
 * even), i32 into itself. */
ATMOE_API atmoe_status atmoe_graph_cast(atmoe_graph *graph, atmoe_node x,
                                        atmoe_dtype dtype, atmoe_node *out);

/* Names a node (names are unique in a graph) and finds a node by name. */
ATMOE_API atmoe_status atmoe_graph_set_name(atmoe_graph *graph,
                                            atmoe_node node, const char *name);
ATMOE_API atmoe_status atmoe_graph_find(const atmoe_graph *graph,
                                        const char *name, atmoe_node *node);
/* Shape and dtype of a node as planned (the largest batch). */
ATMOE_API atmoe_status atmoe_graph_get_shape(const atmoe_graph *graph,
                                             atmoe_node node, int *ndim,
                                             size_t *shape,
                                             atmoe_dtype *dtype);

/* Marks a node as an output: kept after compute for atmoe_graph_read().
 * Nodes that no output needs are not computed. */
ATMOE_API atmoe_status atmoe_graph_mark_output(atmoe_graph *graph, atmoe_node node);

/* Flags of atmoe_graph_plan. */
#define ATMOE_PLAN_NO_REUSE 1u  /* every intermediate gets its own memory */
#define ATMOE_PLAN_NO_INPLACE 2u /* never write an operation's result over
                                    an operand */

/* Plans the graph: order, liveness, buffer reuse (best fit, in place where
 * an operation allows it), one device arena, kernels built. */
ATMOE_API atmoe_status atmoe_graph_plan(atmoe_graph *graph, unsigned flags);

typedef struct atmoe_graph_memory {
    uint64_t arena_bytes;        /* device memory the plan allocated */
    uint64_t intermediate_bytes; /* the sum of the sizes of everything the
                                    arena holds (inputs, intermediates,
                                    outputs, scratch), each aligned: what
                                    the plan would take without reuse */
    uint64_t pinned_bytes;       /* inputs and outputs (in the arena) */
    size_t nodes_computed;       /* nodes an output needs */
    uint64_t gemm_scratch_bytes; /* CLBlast's scratch for padded or
                                    transposed GEMM operands */
} atmoe_graph_memory;

ATMOE_API atmoe_status atmoe_graph_get_memory(const atmoe_graph *graph,
                                              atmoe_graph_memory *memory);

/* Copies host data into an input: rows is the batch for a batched input
 * (at most the planned one; bytes must match that many rows), else 0. */
ATMOE_API atmoe_status atmoe_graph_set_input(atmoe_graph *graph,
                                             atmoe_node input,
                                             const void *data, size_t bytes,
                                             size_t rows);

/* Enqueues every planned node for a batch of `batch` rows (0: the planned
 * batch).  Does not wait; atmoe_graph_read() waits for the result. */
ATMOE_API atmoe_status atmoe_graph_compute(atmoe_graph *graph, size_t batch);

/* What the last atmoe_graph_compute() cost the host: the time it took to
 * check its inputs and enqueue every node (the device works on after it
 * returns), and the host allocations the library made meanwhile, which a
 * plan makes 0 (the library's own allocations: those of the OpenCL driver
 * are not counted). */
typedef struct atmoe_compute_stats {
    double host_ms;
    uint64_t host_allocations;
    size_t batch; /* of that compute */
} atmoe_compute_stats;

/* INVALID_ARGUMENT when nothing was computed since the graph was planned. */
ATMOE_API atmoe_status atmoe_graph_get_compute_stats(
    const atmoe_graph *graph, atmoe_compute_stats *stats);

/* Copies an output of the last compute (its rows of that batch) to host
 * memory in dense row-major order. */
ATMOE_API atmoe_status atmoe_graph_read(atmoe_graph *graph, atmoe_node node,
                                        void *data, size_t bytes);

/* Per-node timing.  When on, each compute records an event per node;
 * atmoe_graph_get_profile() then waits for node i of the computed order
 * (0 <= i < nodes_computed) and reports its time; with profiling off it
 * reports costs only, with ms 0, and does not wait. */
ATMOE_API atmoe_status atmoe_graph_set_profiling(atmoe_graph *graph, int on);

typedef struct atmoe_node_profile {
    atmoe_node node;
    char name[64];
    const char *op;  /* "matmul", "softmax", ... (static storage) */
    double ms;       /* device time of the node's commands */
    uint64_t bytes;  /* bytes it reads and writes, counted once */
    uint64_t flops;  /* floating-point operations */
} atmoe_node_profile;

ATMOE_API atmoe_status atmoe_graph_get_profile(atmoe_graph *graph, size_t i,
                                               atmoe_node_profile *profile);

typedef enum atmoe_dump_format {
    ATMOE_DUMP_TEXT,
    ATMOE_DUMP_DOT
} atmoe_dump_format;

/* Writes the graph (nodes, shapes, and where planned, arena offsets and
 * memory) to path as text or Graphviz dot, atomically. */
ATMOE_API atmoe_status atmoe_graph_dump(const atmoe_graph *graph,
                                        const char *path,
                                        atmoe_dump_format format);


/* ------------------------------------------------------------------------ */
/* Training                                                                  */
/* ------------------------------------------------------------------------ */

/* Marks a parameter (its gradient is computed and its tensor registered
 * for the optimiser) or an input (its gradient is computed, for chaining
 * stacked layers or a host model) trainable, or frozen again (0, the
 * default: no gradient, no gradient memory).  f32 nodes only; before
 * atmoe_graph_backward. */
ATMOE_API atmoe_status atmoe_graph_set_trainable(atmoe_graph *graph,
                                                 atmoe_node node,
                                                 int trainable);

/* Extends graph with the gradient of loss, a scalar f32 node ([1], not
 * batched), with respect to every trainable node that reaches it (reverse
 * mode, through the nodes on a path from a trainable node to the loss).
 * The gradients of trainable nodes and the loss become outputs.  Once per
 * graph: a second call fails (ATMOE_STATUS_INVALID_ARGUMENT).  On failure
 * the graph is as it was. */
ATMOE_API atmoe_status atmoe_graph_backward(atmoe_graph *graph,
                                            atmoe_node loss);

/* The node holding dL/d(node) for a trainable node, after
 * atmoe_graph_backward; read it with atmoe_graph_read after a compute.
 * ATMOE_STATUS_NOT_FOUND when the node does not reach the loss. */
ATMOE_API atmoe_status atmoe_graph_get_grad(const atmoe_graph *graph,
                                            atmoe_node node,
                                            atmoe_node *grad);

/* mean((pred - target)^2) over every element at the computed batch: a
 * scalar [1] node.  pred and target share shape and batch. */
ATMOE_API atmoe_status atmoe_graph_loss_mse(atmoe_graph *graph,
                                            atmoe_node pred,
                                            atmoe_node target,
                                            atmoe_node *loss);

/* The mean over rows t whose label is not ignore_index of
 * logsumexp(logits[t]) - logits[t, labels[t]]: logits f32 [T, C], labels
 * i32 [T] (batched as the logits are).  0, with a zero gradient, when
 * every row is ignored; a label outside [0, C) that is not ignore_index
 * makes the loss and its row's gradient NaN. */
ATMOE_API atmoe_status atmoe_graph_loss_cross_entropy(atmoe_graph *graph,
                                                      atmoe_node logits,
                                                      atmoe_node labels,
                                                      int ignore_index,
                                                      atmoe_node *loss);

/* E sum_i f_i P_i over router weights [T, E]: f_i the fraction of tokens
 * whose top-1 expert is i (no gradient), P_i the mean weight of expert i.
 * Add it to a task loss with a weight through atmoe_graph_scale and
 * atmoe_graph_add. */
ATMOE_API atmoe_status atmoe_graph_loss_load_balance(atmoe_graph *graph,
                                                     atmoe_node router_weights,
                                                     atmoe_node *loss);

/* ------------------------------------------------------------------------ */
/* Expert sets, routers and the fused mixture                                */
/* ------------------------------------------------------------------------ */

/* An expert set stacks LoRA experts of one layer and module: expert e has
 * A_e [r_e, d_in], B_e [d_out, r_e] and scale s_e = alpha / r_e (or
 * alpha / sqrt(r_e) with ATMOE_EXPERT_RSLORA), and belongs to a group.
 * Ranks may differ; nothing is padded.  An optional general LoRA (B_p A_p,
 * s_p) mixes in with weight 1 - lambda (SPEC section 3).
 *
 * A set is filled, then used: the first router or mixture that uses it
 * seals it (its device copy is made then), and adding to a sealed set
 * fails.  Routers and graphs keep the set alive: free it whenever. */
typedef struct atmoe_experts atmoe_experts;

#define ATMOE_EXPERT_RSLORA 1u /* scale alpha / sqrt(rank) */

ATMOE_API atmoe_status atmoe_experts_new(atmoe_context *ctx, size_t d_in,
                                         size_t d_out, atmoe_experts **set);
ATMOE_API void atmoe_experts_free(atmoe_experts *set);

/* Appends an expert to group (0, 1, ...; groups are numbered densely as
 * they are used).  A is [rank, d_in] and B is [d_out, rank], row-major f32
 * host arrays, copied.  *index (may be NULL) receives the expert's
 * position, the column of the router's w output that holds its weight. */
ATMOE_API atmoe_status atmoe_experts_add(atmoe_experts *set, int group,
                                         size_t rank, const float *a,
                                         const float *b, float alpha,
                                         unsigned flags, int *index);

/* Sets the general LoRA, mixed as lambda * (experts) + (1 - lambda) *
 * general; lambda in [0, 1]. */
ATMOE_API atmoe_status atmoe_experts_set_general(atmoe_experts *set,
                                                 size_t rank, const float *a,
                                                 const float *b, float alpha,
                                                 unsigned flags, float lambda);

/* Makes an empty set a T-REX mix-and-match adapter (SPEC section 4): down
 * vectors A [r1, d_in] and up vectors B [d_out, r2], whose r1*r2 rank-1
 * experts the ATMOE_MIX_DENSE mixture combines with per-token gates
 * G [r1, r2].  Such a set takes no other expert. */
ATMOE_API atmoe_status atmoe_experts_set_dense(atmoe_experts *set, size_t r1,
                                               const float *a, size_t r2,
                                               const float *b);

typedef struct atmoe_experts_info {
    size_t d_in, d_out;
    size_t experts;     /* count, without the general LoRA */
    size_t groups;
    size_t max_group;   /* experts in the largest group (M_max) */
    size_t total_rank;  /* R: sum of ranks, general LoRA included (r1 for
                           a dense set) */
    size_t dense_r2;    /* r2 of a dense set, 0 otherwise */
    int has_general;
    float lambda;
} atmoe_experts_info;

ATMOE_API atmoe_status atmoe_experts_get_info(const atmoe_experts *set,
                                              atmoe_experts_info *info);

/* One expert of a set, as atmoe_experts_add (or atmoe_experts_set_general)
 * received it. */
typedef struct atmoe_expert_info {
    int group;      /* -1 for the general LoRA */
    int position;   /* within its group (0 for the general LoRA) */
    size_t rank;
    float alpha;
    unsigned flags; /* ATMOE_EXPERT_RSLORA or 0 */
    float scale;    /* alpha / rank, or alpha / sqrt(rank) */
} atmoe_expert_info;

/* Describes expert index (0 <= index < experts; index == experts is the
 * general LoRA when the set has one) and copies its A [rank, d_in] and
 * B [d_out, rank] into a and b, from the host copy or, once the set is
 * sealed, from the device copy.  info, a and b may each be NULL; a and b
 * must otherwise hold a_count and b_count elements, the products of the
 * shapes.  Not for dense sets. */
ATMOE_API atmoe_status atmoe_experts_get_expert(const atmoe_experts *set,
                                                size_t index,
                                                atmoe_expert_info *info,
                                                float *a, size_t a_count,
                                                float *b, size_t b_count);

/* Storage types of the set's stacked A_all and B_all: f32 (the default),
 * f16 or bf16, any of them with any W0 and router weights.  The f32
 * arrays given to atmoe_experts_add are rounded to nearest even when the
 * set is sealed, and the fused mixture reads them as stored, summing in
 * f32 (u and z stay f32).  atmoe_experts_get_expert then returns the
 * stored values.  Only before the set is sealed; any other type is
 * ATMOE_STATUS_DTYPE_MISMATCH. */
ATMOE_API atmoe_status atmoe_experts_set_dtype(atmoe_experts *set,
                                               atmoe_dtype a_dtype,
                                               atmoe_dtype b_dtype);
/* The storage types in force (either pointer may be NULL). */
ATMOE_API atmoe_status atmoe_experts_get_dtype(const atmoe_experts *set,
                                               atmoe_dtype *a_dtype,
                                               atmoe_dtype *b_dtype);

/* The grouped router of AT-MoE (SPEC section 3). */
typedef struct atmoe_router atmoe_router;

typedef enum atmoe_router_form {
    ATMOE_ROUTER_PROJECTED, /* within-group logits h W_D, W_D [d_in, G*M_max] */
    ATMOE_ROUTER_SCALED     /* within-group logits a[g] V_D[g,m], V_D [G, M_max] */
} atmoe_router_form;

/* A router over the groups and experts of set.  Temperatures must be > 0;
 * top_k_groups and top_k_experts of 0 keep all. */
ATMOE_API atmoe_status atmoe_router_new(atmoe_experts *set,
                                        atmoe_router_form form, float tau_g,
                                        float tau_d, int top_k_groups,
                                        int top_k_experts,
                                        atmoe_router **router);
ATMOE_API void atmoe_router_free(atmoe_router *router);

/* Control, effective from the next compute: a masked group or expert gets
 * weight 0 and the others share its mass (expert -1 means the whole
 * group); a fixed weight overrides the router for a group (expert -1) or
 * an expert, the free ones sharing what is left; NaN frees it again.
 * expert is the position within the group (the order of atmoe_experts_add
 * calls for that group), not the set-wide index.  The fixed weights of the
 * groups, or of one group's experts, may add up to at most 1 (a call that
 * would pass it is refused and changes nothing).  A mask wins over a fixed
 * weight.  Fixed groups are always kept and do not count towards top-k. */
ATMOE_API atmoe_status atmoe_router_set_mask(atmoe_router *router, int group,
                                             int expert, int enabled);
ATMOE_API atmoe_status atmoe_router_set_fixed(atmoe_router *router, int group,
                                              int expert, float weight);

/* Adds the router to a graph: h [rows, d_in] (token hidden states, or one
 * pooled vector per sequence), w_g [d_in, G], and w_d [d_in, G*M_max]
 * (projected form) or v_d [G, M_max] (scaled form).  Outputs (any may be
 * NULL): a [rows, G] group weights, d [rows, G*M_max] within-group weights
 * (slot g*M_max + m), w [rows, E] final expert weights in expert order:
 * mark them as outputs to trace the router.  NaN in the router weights is
 * not detected: it gives NaN weights, which the trace shows. */
ATMOE_API atmoe_status atmoe_graph_router(atmoe_graph *graph, atmoe_node h,
                                          atmoe_router *router,
                                          atmoe_node w_g, atmoe_node w_d,
                                          atmoe_node *a, atmoe_node *d,
                                          atmoe_node *w);

typedef enum atmoe_mix {
    ATMOE_MIX_BLOCK,    /* gates [rows, E]: z_e = lambda w_e s_e u_e */
    ATMOE_MIX_DIAGONAL, /* gates [rows, R]: z_i = g_i s_e(i) u_i */
    ATMOE_MIX_DENSE     /* gates [rows, r1*r2]: z = G^T u (a dense set) */
} atmoe_mix;

/* y = x W0^T (+ bias) + c * B_all M(gates) A_all x: the fused shrink ->
 * mix -> expand over the experts of set.  x [T, d_in]; w0 [d_out, d_in];
 * bias [d_out] or ATMOE_NODE_NONE; gates as the mix says, one row per
 * token, or one row per sequence with gate_index [T] (i32) naming each
 * token's row (per-sequence routing; one-hot rows serve one adapter per
 * sequence), or a single row that every token uses (gate_index
 * ATMOE_NODE_NONE).  A token whose gate_index is outside the gate rows gets
 * no gated channel: the base projection, and with the block mix the
 * general LoRA.  Rank channels are stacked in the order the experts (and
 * the general LoRA) were added; the diagonal mix gates every channel, the
 * general LoRA's included.  With a single row the mixture may instead be merged
 * into the base weight, W' = W0 + c B_all M A_all, and run as one GEMM:
 * see atmoe_graph_mixture_set_merge. */
ATMOE_API atmoe_status atmoe_graph_mixture(atmoe_graph *graph, atmoe_node x,
                                           atmoe_node w0, atmoe_node bias,
                                           atmoe_experts *set,
                                           atmoe_mix mix, atmoe_node gates,
                                           atmoe_node gate_index, float c,
                                           atmoe_node *y);

/* An AT-MoE layer: the router in front of the fused mixture, over one base
 * projection.  Fill every field (ATMOE_NODE_NONE for absent nodes). */
typedef struct atmoe_layer {
    atmoe_node w0;           /* [d_out, d_in] base weight */
    atmoe_node bias;         /* [d_out] or ATMOE_NODE_NONE */
    atmoe_experts *experts;
    atmoe_router *router;
    atmoe_node w_g, w_d;     /* router weights (w_d or v_d by its form) */
    atmoe_node router_input; /* ATMOE_NODE_NONE routes each token by its
                                hidden state; else [S, d_in], one row per
                                sequence (a pooled instruction embedding) */
    atmoe_node gate_index;   /* with router_input: i32 [T], each token's
                                sequence */
    float c;                 /* gate on the adapters' sum (experts and
                                general LoRA), 1 for AT-MoE */
} atmoe_layer;

/* The router's outputs of one layer, for interpretability (see
 * atmoe_graph_router); mark them as outputs to read them. */
typedef struct atmoe_layer_trace {
    atmoe_node a, d, w;
} atmoe_layer_trace;

/* Adds one layer: y = mixture(x) routed by the layer's router. */
ATMOE_API atmoe_status atmoe_graph_moe_layer(atmoe_graph *graph, atmoe_node x,
                                             const atmoe_layer *layer,
                                             atmoe_node *y,
                                             atmoe_layer_trace *trace);

/* Adds n layers, each fed by the one before (d_out of a layer is d_in of
 * the next); traces (may be NULL) receives n entries. */
ATMOE_API atmoe_status atmoe_graph_moe_stack(atmoe_graph *graph, atmoe_node x,
                                             const atmoe_layer *layers,
                                             size_t n, atmoe_node *y,
                                             atmoe_layer_trace *traces);

typedef enum atmoe_merge {
    ATMOE_MERGE_AUTO,   /* merge when it costs fewer FLOPs at the batch run */
    ATMOE_MERGE_NEVER,
    ATMOE_MERGE_ALWAYS
} atmoe_merge;

/* Chooses the merge path of a mixture node whose gates have a single row.
 * AUTO merges a batch of T tokens when T (R d_in + Z d_out) exceeds
 * (Z + 1) d_in d_out (Z = R, or r2 for the dense mix): the FLOPs of the
 * unmerged shrink and expand against those of folding the experts into a
 * copy of W0.  Both paths give the same result within rounding.  The plan
 * reserves the merged weight's memory when merging is possible. */
ATMOE_API atmoe_status atmoe_graph_mixture_set_merge(atmoe_graph *graph,
                                                     atmoe_node mixture,
                                                     atmoe_merge mode);

/* ------------------------------------------------------------------------ */
/* Training the experts of a set                                             */
/* ------------------------------------------------------------------------ */

/* Flags of atmoe_experts_set_trainable. */
#define ATMOE_TRAIN_A 1u /* the expert's A (down projection) */
#define ATMOE_TRAIN_B 2u /* the expert's B (up projection) */

/* Marks expert index of set trainable (what: ATMOE_TRAIN_A | ATMOE_TRAIN_B)
 * or frozen (0, the default).  index == experts is the general LoRA; a
 * dense set's index 0 is its down (A) and up (B) vectors.  The backward
 * pass of every mixture over the set built afterwards registers the
 * gradients of exactly those weights, named "<mixture>/expert<i>/A" and
 * "<mixture>/expert<i>/B_T" (B transposed, [rank, d_out], as the set
 * stores it), "<mixture>/general/..." and "<mixture>/dense/...".  Training
 * needs f32 storage.  Plan graphs over the set after changing B's flag. */
ATMOE_API atmoe_status atmoe_experts_set_trainable(atmoe_experts *set,
                                                   size_t index,
                                                   unsigned what);

/* ------------------------------------------------------------------------ */
/* Rank-1 expert layers (Intuition-MoR1E / T-REX)                            */
/* ------------------------------------------------------------------------ */

/* A layer of rank-1 experts with an intuition-aware router (SPEC section
 * 4), per token x:
 *
 *   p  = softmax(W_r x)                                   [E]
 *   om = sigmoid(100 w_om)
 *   g  = k_router om p + k_intuition (1 - om) s           [E]
 *   v1: z = g (.) (A x)          (E = r1 = r2, expert i the channel i)
 *   v2: z = G^T (A x), G = g as [r1, r2] row-major  (E = r1 r2)
 *   c  = sigmoid(100 w_c)
 *   y  = x W0^T + bias + c B z
 *
 * with no alpha / r scale on the experts (c takes that role).  s is the
 * token's intuition score: the row of its sample in scores [S, K] (raw dot
 * products C e of the clustering's centroids with the sample's instruction
 * embedding), mapped to the experts by score_map [K, E] when given
 * (s = scores_row score_map), else K = E and cluster k drives expert k.
 *
 * Sparse routing: top_k (1..E) keeps the top_k largest g per token (ties:
 * the lower expert first); the router's p is renormalised over the kept
 * experts before g is formed again, the others get g = 0, and the mix
 * skips them.  top_k = 0 (or E) keeps all: with top_k = E the result is
 * that of dense routing. */
typedef enum atmoe_mor1e_variant {
    ATMOE_MOR1E_V1, /* rank1: E = r, diagonal mix */
    ATMOE_MOR1E_V2  /* mix-and-match: E = r1 r2, dense mix */
} atmoe_mor1e_variant;

/* The ablations of the gate g. */
typedef enum atmoe_mor1e_routing {
    ATMOE_MOR1E_ROUTE_BOTH,      /* router and intuition (T-REX) */
    ATMOE_MOR1E_ROUTE_ROUTER,    /* s = 0: g = k_router om p */
    ATMOE_MOR1E_ROUTE_INTUITION  /* router off: g = k_intuition (1 - om) s */
} atmoe_mor1e_routing;

/* The reference code's constants k_router and k_intuition. */
#define ATMOE_MOR1E_K_ROUTER 32.0f
#define ATMOE_MOR1E_K_INTUITION 4.0f

/* A rank-1 expert layer.  Fill every field (ATMOE_NODE_NONE for absent
 * nodes); all nodes are f32 (w0 also f16 or bf16) and unbatched except
 * scores and gate_index. */
typedef struct atmoe_mor1e_layer {
    atmoe_node w0;        /* [d_out, d_in] base weight */
    atmoe_node bias;      /* [d_out] or ATMOE_NODE_NONE */
    atmoe_node a;         /* [r1, d_in] down vectors */
    atmoe_node b;         /* [d_out, r2] up vectors */
    atmoe_node w_r;       /* [E, d_in] router; ATMOE_NODE_NONE with
                             ATMOE_MOR1E_ROUTE_INTUITION */
    atmoe_node w_om, w_c; /* [1] gate weights */
    atmoe_node scores;    /* intuition scores: [S, K] with gate_index, [1, K]
                             for every token, or [T, K] (batched like x)
                             one row per token; ATMOE_NODE_NONE with
                             ATMOE_MOR1E_ROUTE_ROUTER */
    atmoe_node score_map; /* [K, E], or ATMOE_NODE_NONE when K = E */
    atmoe_node gate_index; /* i32 [T]: each token's row of scores (its
                              sample); a token whose index is outside
                              [0, S) gets s = 0.  Or ATMOE_NODE_NONE */
    atmoe_mor1e_variant variant;
    atmoe_mor1e_routing routing;
    float k_router, k_intuition; /* ATMOE_MOR1E_K_ROUTER, _K_INTUITION */
    int top_k;                   /* 0 keeps all */
} atmoe_mor1e_layer;

/* The layer's router, for interpretability and load balancing; mark the
 * nodes as outputs to read them.  p [T, E]: the router's softmax (before
 * top-k; ATMOE_NODE_NONE with the router off); gates [T, E]: g as it
 * drives the mix (0 for experts top-k dropped); load [E]: the fraction of
 * tokens whose largest gate is the expert's (the f_i of a Switch-style
 * balancing loss N sum_i f_i P_i); importance [E]: the mean of p over the
 * tokens (P_i; ATMOE_NODE_NONE with the router off).  load and importance
 * are computed only when an output needs them. */
typedef struct atmoe_mor1e_trace {
    atmoe_node p, gates, load, importance;
} atmoe_mor1e_trace;

/* Adds one rank-1 expert layer over x [T, d_in]: the router's logits in
 * the same pass over x as the shrink (W_r stacked under A), one kernel for
 * softmax, intuition mix, top-k, gates and mix, then the base projection
 * with the expand.  trace may be NULL. */
ATMOE_API atmoe_status atmoe_graph_mor1e_layer(atmoe_graph *graph,
                                               atmoe_node x,
                                               const atmoe_mor1e_layer *layer,
                                               atmoe_node *y,
                                               atmoe_mor1e_trace *trace);

/* The reference initialisation: a [r1, d_in] Kaiming-uniform as PyTorch's
 * kaiming_uniform_(a = sqrt(5)) (uniform in +-1/sqrt(d_in)) from seed,
 * b, w_r, w_om and w_c zero.  Any of b, w_r, w_om, w_c may be NULL (left
 * as they are); all are f32 tensors of one context. */
ATMOE_API atmoe_status atmoe_mor1e_init(atmoe_tensor *a, atmoe_tensor *b,
                                        atmoe_tensor *w_r,
                                        atmoe_tensor *w_om,
                                        atmoe_tensor *w_c, uint64_t seed);

/* ------------------------------------------------------------------------ */
/* safetensors files                                                         */
/* ------------------------------------------------------------------------ */

/* A safetensors file opened for reading: the file is memory-mapped and its
 * header checked against every rule of the format (header length within
 * the file and below 100 MB, valid JSON, known dtypes, offsets contiguous
 * from 0 and inside the file, sizes equal to count x dtype size, no
 * duplicate names, no shape whose count overflows).  Tensors are listed in
 * the order of their data in the file. */
typedef struct atmoe_safetensors atmoe_safetensors;

/* The format's dtypes.  F32, F16, BF16 and F64 convert to f32 on reading. */
typedef enum atmoe_safetensors_dtype {
    ATMOE_SAFETENSORS_BOOL,
    ATMOE_SAFETENSORS_U8,
    ATMOE_SAFETENSORS_I8,
    ATMOE_SAFETENSORS_F8_E4M3,
    ATMOE_SAFETENSORS_F8_E5M2,
    ATMOE_SAFETENSORS_I16,
    ATMOE_SAFETENSORS_U16,
    ATMOE_SAFETENSORS_F16,
    ATMOE_SAFETENSORS_BF16,
    ATMOE_SAFETENSORS_I32,
    ATMOE_SAFETENSORS_U32,
    ATMOE_SAFETENSORS_F32,
    ATMOE_SAFETENSORS_I64,
    ATMOE_SAFETENSORS_U64,
    ATMOE_SAFETENSORS_F64
} atmoe_safetensors_dtype;

/* The format's name of a dtype ("BF16"); "unknown" outside the list. */
ATMOE_API const char *atmoe_safetensors_dtype_name(atmoe_safetensors_dtype dtype);

#define ATMOE_SAFETENSORS_MAX_DIMS 8

/* One tensor of an open file.  name and data belong to the file and stay
 * valid until it is closed; data is little-endian, as stored. */
typedef struct atmoe_safetensors_tensor {
    const char *name;
    atmoe_safetensors_dtype dtype;
    int ndim; /* 0 for a scalar */
    uint64_t shape[ATMOE_SAFETENSORS_MAX_DIMS];
    uint64_t count;  /* product of the shape (1 for a scalar) */
    uint64_t nbytes;
    const void *data;
} atmoe_safetensors_tensor;

/* ctx may be NULL; errors then go to the thread's message. */
ATMOE_API atmoe_status atmoe_safetensors_open(atmoe_context *ctx,
                                              const char *path,
                                              atmoe_safetensors **file);
ATMOE_API void atmoe_safetensors_free(atmoe_safetensors *file);
ATMOE_API atmoe_status atmoe_safetensors_get_count(const atmoe_safetensors *file,
                                               size_t *count);
ATMOE_API atmoe_status atmoe_safetensors_get(const atmoe_safetensors *file,
                                             size_t index,
                                             atmoe_safetensors_tensor *tensor);
/* ATMOE_STATUS_NOT_FOUND when the file has no tensor of that name. */
ATMOE_API atmoe_status atmoe_safetensors_find(const atmoe_safetensors *file,
                                              const char *name,
                                              atmoe_safetensors_tensor *tensor);
/* Copies a floating-point tensor into dst as f32; count must equal the
 * tensor's count. */
ATMOE_API atmoe_status atmoe_safetensors_read_f32(
    const atmoe_safetensors *file, const char *name, float *dst,
    size_t count);
/* A value of the header's __metadata__ map (NOT_FOUND when absent). */
ATMOE_API atmoe_status atmoe_safetensors_get_metadata(
    const atmoe_safetensors *file, const char *key, const char **value);

/* A file being built: tensors and metadata are copied in, then saved at
 * once, sorted (by dtype alignment, then name) and aligned as the reference
 * writer does, through a temporary file renamed into place. */
typedef struct atmoe_safetensors_writer atmoe_safetensors_writer;

ATMOE_API atmoe_status atmoe_safetensors_writer_new(
    atmoe_context *ctx, atmoe_safetensors_writer **writer);
ATMOE_API void atmoe_safetensors_writer_free(atmoe_safetensors_writer *writer);
/* Adds raw little-endian data of the given dtype. */
ATMOE_API atmoe_status atmoe_safetensors_writer_add(
    atmoe_safetensors_writer *writer, const char *name, atmoe_safetensors_dtype dtype,
    int ndim, const uint64_t *shape, const void *data);
/* Adds f32 data stored as F32, F16 or BF16 (rounded to nearest even). */
ATMOE_API atmoe_status atmoe_safetensors_writer_add_f32(
    atmoe_safetensors_writer *writer, const char *name, atmoe_safetensors_dtype stored,
    int ndim, const uint64_t *shape, const float *data);
ATMOE_API atmoe_status atmoe_safetensors_writer_set_metadata(
    atmoe_safetensors_writer *writer, const char *key, const char *value);
ATMOE_API atmoe_status atmoe_safetensors_writer_save(
    atmoe_safetensors_writer *writer, const char *path);

/* ------------------------------------------------------------------------ */
/* PEFT LoRA adapters                                                        */
/* ------------------------------------------------------------------------ */

/* A PEFT LoRA adapter: a directory holding adapter_config.json and
 * adapter_model.safetensors, as PEFT's save_pretrained() writes it.  Its
 * targets are the modules the weights file holds LoRA pairs for: a tensor
 * "base_model.model.<module>.lora_A.weight" [r, in] and its
 * "...lora_B.weight" [out, r].  A target's rank and alpha come from r and
 * lora_alpha, or from the rank_pattern and alpha_pattern entry that matches
 * the module the way PEFT matches it (the first key, in the file's order,
 * that matches the whole module path as the regular expression
 * "(.*\.)?(KEY)"); its scale is alpha / rank, or alpha / sqrt(rank) with
 * use_rslora.  Pattern keys, a target_modules string and layers_pattern are
 * Python regular expressions in PEFT; the library reads them as POSIX
 * extended ones, with \d, \D and (?: understood, and refuses a key that
 * does not compile (FORMAT_ERROR).
 *
 * Opening checks what PEFT would: every weight must belong to a module
 * that target_modules selects (and exclude_modules, layers_to_transform do
 * not leave out), with A and B both present and shaped as the rank says.
 * What the library cannot compute is refused with NOT_SUPPORTED and a
 * message saying why: peft_type other than LORA, use_dora (a magnitude
 * vector rescales the adapted weight), lora_bias and bias other than
 * "none" (trained biases), modules_to_save (whole modules replaced),
 * embedding targets (lora_embedding_A/B), trainable tokens and layer
 * replication (and a few rarer methods: see atmoe_adapter_open(3)).
 * fan_in_fan_out describes the base layer (GPT-2's Conv1D
 * stores its weight [in, out]); PEFT stores lora_A [r, in] and lora_B
 * [out, r] whatever it says, so the library reads them as they are and
 * reports the flag (see the manifest's "transposed" for the base weight).
 *
 * A target's layer is the index PEFT's layers_to_transform reads: the
 * last all-digit component of the module path that has a component after
 * it and, before it, a component that layers_pattern matches or, without
 * layers_pattern, two components ("model.layers.3.self_attn.q_proj" is
 * layer 3, "layers.3.q_proj" has none); -1 when there is none.
 *
 * An adapter opened from a directory reads its weights from the file on
 * demand; atmoe_adapter_new() makes an empty one.  Both take targets from
 * atmoe_adapter_set() and are written by atmoe_adapter_save().  The
 * context may be NULL: errors then go to the thread's message.  Strings
 * an adapter hands out stay valid until it is freed. */
typedef struct atmoe_adapter atmoe_adapter;

ATMOE_API atmoe_status atmoe_adapter_open(atmoe_context *ctx,
                                          const char *dir,
                                          atmoe_adapter **adapter);
ATMOE_API atmoe_status atmoe_adapter_new(atmoe_context *ctx,
                                         atmoe_adapter **adapter);
/* NULL is a no-op. */
ATMOE_API void atmoe_adapter_free(atmoe_adapter *adapter);

typedef struct atmoe_adapter_info {
    size_t targets;
    size_t r;              /* the config's r and lora_alpha (for a new */
    float alpha;           /* adapter, those of its first target, or 0) */
    int use_rslora;
    int fan_in_fan_out;
    const char *base_model; /* base_model_name_or_path, "" when absent */
    const char *dir;        /* the directory it was opened from, or "" */
} atmoe_adapter_info;

ATMOE_API atmoe_status atmoe_adapter_get_info(const atmoe_adapter *adapter,
                                              atmoe_adapter_info *info);

typedef struct atmoe_adapter_target {
    const char *module; /* "model.layers.3.self_attn.q_proj" */
    const char *name;   /* the path after the layer index
                           ("self_attn.q_proj"), or the whole path */
    int layer;          /* -1 when the path has no layer index */
    size_t rank, d_in, d_out;
    float alpha;
    unsigned flags;     /* ATMOE_EXPERT_RSLORA or 0 */
    float scale;        /* alpha / rank or alpha / sqrt(rank) */
} atmoe_adapter_target;

/* Targets are listed in the order of their module paths, numbers compared
 * as numbers (layer 2 before layer 10). */
ATMOE_API atmoe_status atmoe_adapter_get_target(const atmoe_adapter *adapter,
                                                size_t index,
                                                atmoe_adapter_target *target);

/* Finds the target of a layer (-1: a module with no layer index) whose
 * module path is module or ends with "." module ("q_proj",
 * "self_attn.q_proj", or the whole path).  NOT_FOUND when none does,
 * INVALID_ARGUMENT naming two when several do. */
ATMOE_API atmoe_status atmoe_adapter_find(const atmoe_adapter *adapter,
                                          int layer, const char *module,
                                          size_t *index);

/* Copies a target's A [rank, d_in] and B [d_out, rank] as f32 (either
 * pointer may be NULL; counts must equal the shapes' products). */
ATMOE_API atmoe_status atmoe_adapter_read(const atmoe_adapter *adapter,
                                          size_t index, float *a,
                                          size_t a_count, float *b,
                                          size_t b_count);

/* Adds a target, or replaces the one of the same module path: a
 * [rank, d_in] and b [d_out, rank] are copied.  module is the path inside
 * the model, without PEFT's "base_model.model." prefix. */
ATMOE_API atmoe_status atmoe_adapter_set(atmoe_adapter *adapter,
                                         const char *module, size_t rank,
                                         size_t d_in, size_t d_out,
                                         const float *a, const float *b,
                                         float alpha, unsigned flags);

/* Writes dir/adapter_model.safetensors (weights stored as dtype: F32, F16
 * or BF16) and dir/adapter_config.json so that PEFT loads them with
 * PeftModel.from_pretrained(): peft_type "LORA", target_modules the full
 * module paths, r and lora_alpha those of the first target, and
 * rank_pattern and alpha_pattern entries for the targets that differ.
 * use_rslora is that of the first target; a target scaled the other way
 * gets the alpha that gives its scale.  dir is created when missing (not
 * its parents).  Each file is written to a temporary file and renamed;
 * the config is renamed last, after the weights. */
ATMOE_API atmoe_status atmoe_adapter_save(const atmoe_adapter *adapter,
                                          const char *dir,
                                          atmoe_safetensors_dtype dtype);

/* Appends target index of adapter to group of set as atmoe_experts_add
 * does, with the target's alpha and scaling; its d_in and d_out must be the
 * set's. */
ATMOE_API atmoe_status atmoe_experts_add_adapter(atmoe_experts *set,
                                                 int group,
                                                 const atmoe_adapter *adapter,
                                                 size_t index, int *expert);

/* ------------------------------------------------------------------------ */
/* Layer manifests                                                           */
/* ------------------------------------------------------------------------ */

/* A layer manifest (a JSON file; atmoe-manifest(5) describes it) names, for
 * a stack of layers and the modules of each, the base weight, the adapter
 * directories that form each group of experts, the general LoRA and lambda,
 * the router's tensors and options, and c.  Relative paths are resolved
 * against the manifest's directory.
 *
 * Opening parses and checks the JSON only: an unknown key, a wrong type or
 * a value out of range is a FORMAT_ERROR whose message names the JSON path
 * ("layers[1].modules.q_proj.router.tau_g: ...").  atmoe_manifest_check()
 * then opens every file it names and checks every shape;
 * atmoe_manifest_build() adds the stack to a graph.  The context may be
 * NULL (errors then go to the thread's message); atmoe_manifest_build
 * reports to the graph's context.  Strings a manifest hands out stay valid
 * until it is freed. */
typedef struct atmoe_manifest atmoe_manifest;

ATMOE_API atmoe_status atmoe_manifest_open(atmoe_context *ctx,
                                           const char *path,
                                           atmoe_manifest **manifest);
/* The same from size bytes of JSON text; relative paths are resolved
 * against dir (NULL: the current directory). */
ATMOE_API atmoe_status atmoe_manifest_parse(atmoe_context *ctx,
                                            const char *text, size_t size,
                                            const char *dir,
                                            atmoe_manifest **manifest);
/* NULL is a no-op. */
ATMOE_API void atmoe_manifest_free(atmoe_manifest *manifest);

typedef struct atmoe_manifest_info {
    size_t layers;
    size_t modules;  /* over all layers */
    int checked;     /* atmoe_manifest_check() has succeeded */
    size_t d_in;     /* the stack's input and output widths, once checked */
    size_t d_out;
    /* The centroids C [clusters, embedding_dim] that score the samples of
     * rank-1 modules (file NULL when the manifest names none); the sizes
     * once checked, else 0. */
    const char *centroids_file, *centroids_tensor;
    size_t clusters, embedding_dim;
    /* The linear head W [classes, d_out] of a classification ("head";
     * file NULL when the manifest has none; classes once checked, else 0)
     * and the label that marks a row to leave out of its loss. */
    const char *head_file, *head_tensor;
    size_t classes;
    int ignore_index;
} atmoe_manifest_info;

ATMOE_API atmoe_status atmoe_manifest_get_info(const atmoe_manifest *manifest,
                                               atmoe_manifest_info *info);

/* A tensor the manifest names. */
typedef struct atmoe_manifest_tensor {
    const char *file;   /* resolved path; NULL when the entry is absent */
    const char *tensor;
    int transposed;     /* stored [in, out] (a Conv1D weight) */
} atmoe_manifest_tensor;

/* Module index (0 <= index < modules; layer by layer, modules in the
 * manifest's order). */
typedef struct atmoe_manifest_module {
    size_t layer;          /* position of its layer in the manifest */
    int model_layer;       /* the layer index adapters are looked up with */
    const char *name;      /* the module's key ("q_proj") */
    int is_output;         /* its output feeds the next layer */
    atmoe_manifest_tensor weight, bias, w_g, w_d; /* w_d is v_d with the
                                                     scaled form */
    size_t groups;
    size_t experts;        /* over all groups, without the general LoRA */
    int has_general;
    float lambda, c;
    atmoe_router_form form;
    float tau_g, tau_d;
    int top_k_groups, top_k_experts;
    size_t masks, fixed;   /* the router's masks and fixed weights */
    size_t d_in, d_out;    /* once checked, else 0 */
    /* A rank-1 expert module (atmoe_graph_mor1e_layer): rank1 is 1, and
     * groups and experts are 0. */
    int rank1;
    atmoe_mor1e_variant variant;
    atmoe_mor1e_routing routing;
    atmoe_manifest_tensor a, b, w_r, w_om, w_c, score_map;
    float k_router, k_intuition;
    int top_k;
    size_t r1, r2, rank1_experts; /* once checked, else 0 */
} atmoe_manifest_module;

ATMOE_API atmoe_status atmoe_manifest_get_module(
    const atmoe_manifest *manifest, size_t index,
    atmoe_manifest_module *module);

/* Expert index of a module: groups in order, experts of a group in order
 * (the column order of the router's w); index == experts is the general
 * LoRA. */
typedef struct atmoe_manifest_expert {
    int group;            /* -1 for the general LoRA */
    int position;         /* within the group */
    const char *adapter;  /* resolved directory */
    int layer;            /* what is looked up in the adapter */
    const char *module;
    const char *target;   /* once checked: the adapter's module path, else
                             NULL */
    size_t rank;          /* once checked, else 0 */
    float alpha, scale;
    unsigned flags;
} atmoe_manifest_expert;

ATMOE_API atmoe_status atmoe_manifest_get_expert(
    const atmoe_manifest *manifest, size_t module, size_t index,
    atmoe_manifest_expert *expert);

/* How a checked manifest holds module index's weights on the device
 * (atmoe-manifest(5), "dtype"): each tensor's type in its file and on the
 * device (an absent w_g or w_d, which is zeros, is F32 and f32), the
 * expert set's A_all and B_all likewise (the adapters' common type, F32
 * when they differ), and the device bytes the module takes once built:
 * its tensors, the expert set's copies and the router's arrays, not the
 * graph's arena.  Before atmoe_manifest_check() succeeds,
 * ATMOE_STATUS_INVALID_ARGUMENT. */
typedef struct atmoe_manifest_storage {
    atmoe_safetensors_dtype weight_file, bias_file, w_g_file, w_d_file;
    atmoe_safetensors_dtype a_file, b_file;
    atmoe_dtype weight, bias, w_g, w_d, a, b;
    uint64_t device_bytes;
} atmoe_manifest_storage;

ATMOE_API atmoe_status atmoe_manifest_get_storage(
    const atmoe_manifest *manifest, size_t module,
    atmoe_manifest_storage *storage);

/* Opens every file and adapter the manifest names (each once) and checks
 * every tensor and shape: module widths, biases, adapter targets, router
 * tensors, and that each layer's output width is the next layer's input
 * width.  The message names the JSON path and the file.  Files stay open
 * until the manifest is freed. */
ATMOE_API atmoe_status atmoe_manifest_check(atmoe_manifest *manifest);

/* Checks the manifest if not done yet, then adds the stack to graph: every
 * module of a layer reads the layer's input x [T, d_in], and the output
 * module's result is the next layer's input; *y is the last one's.  Expert
 * sets, routers (with the manifest's masks and fixed weights), base
 * weights and router tensors become objects and constants of the graph.
 * router_input [S, d_in] with gate_index i32 [T], or both
 * ATMOE_NODE_NONE, as in atmoe_layer.  outputs and traces (either may be
 * NULL) receive one entry per module, in module order.  On failure the
 * graph is as it was. */
ATMOE_API atmoe_status atmoe_manifest_build(atmoe_manifest *manifest,
                                            atmoe_graph *graph, atmoe_node x,
                                            atmoe_node router_input,
                                            atmoe_node gate_index,
                                            atmoe_node *outputs,
                                            atmoe_layer_trace *traces,
                                            atmoe_node *y);

/* The per-sample inputs of atmoe_manifest_build_with.  Fill every field
 * (ATMOE_NODE_NONE for absent nodes). */
typedef struct atmoe_manifest_inputs {
    atmoe_node router_input; /* AT-MoE modules: [S, d_in] or NONE */
    atmoe_node gate_index;   /* i32 [T]: each token's sample, or NONE */
    /* Rank-1 modules' intuition: the samples' instruction embeddings
     * e [S, D] (mean-pooled), L2-normalised and scored s = C e against the
     * manifest's centroids, or the scores [S, K] themselves (scores wins
     * when both are given); [1, .] serves every token without gate_index. */
    atmoe_node embeddings, scores;
} atmoe_manifest_inputs;

/* atmoe_manifest_build for manifests with rank-1 modules (it also builds
 * the others): inputs as above; rank1_traces (may be NULL) receives one
 * entry per module, ATMOE_NODE_NONE in those of modules of LoRA experts
 * (as traces does for rank-1 modules).  A rank-1 module whose routing uses
 * the intuition needs scores, or embeddings and the manifest's centroids. */
ATMOE_API atmoe_status atmoe_manifest_build_with(
    atmoe_manifest *manifest, atmoe_graph *graph, atmoe_node x,
    const atmoe_manifest_inputs *inputs, atmoe_node *outputs,
    atmoe_layer_trace *traces, atmoe_mor1e_trace *rank1_traces,
    atmoe_node *y);

/* The logits of the manifest's linear head ("head") over the stack's
 * output y [T, d_out]: *logits = y W^T + b [T, classes], W and b f32
 * constants of the graph (frozen).  Checks the manifest if not done yet;
 * INVALID_ARGUMENT when it has no head.  On failure the graph is as it
 * was. */
ATMOE_API atmoe_status atmoe_manifest_build_head(atmoe_manifest *manifest,
                                                 atmoe_graph *graph,
                                                 atmoe_node y,
                                                 atmoe_node *logits);

/* ------------------------------------------------------------------------ */
/* Training: trainable parameters by name, the optimiser, checkpoints        */
/* ------------------------------------------------------------------------ */

/* The trainable weights of a graph are those the backward pass registered
 * (graph parameters marked trainable, experts' A and B, router tensors):
 * each has a unique name ("w_g", "layer0.experts.3.A"), a shape, its
 * values in device memory and, after a compute, its gradient in a node of
 * the graph.  The functions below reach them by name, so that an expert's
 * slice of a stacked buffer reads like any parameter. */
typedef struct atmoe_trainable_info {
    const char *name; /* the graph's; valid until the next backward pass */
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
    size_t count; /* elements, the product of shape */
} atmoe_trainable_info;

ATMOE_API atmoe_status atmoe_graph_get_trainable_count(
    const atmoe_graph *graph, size_t *count);
/* Entry index < count, in the order of registration (OUT_OF_RANGE
 * otherwise). */
ATMOE_API atmoe_status atmoe_graph_get_trainable(const atmoe_graph *graph,
                                                 size_t index,
                                                 atmoe_trainable_info *info);
/* Copies the named weight's count f32 values (count must be its count:
 * SHAPE_MISMATCH) to or from the host; NOT_FOUND for an unknown name.
 * Both wait for the commands enqueued before them. */
ATMOE_API atmoe_status atmoe_graph_read_trainable(atmoe_graph *graph,
                                                  const char *name,
                                                  float *data, size_t count);
ATMOE_API atmoe_status atmoe_graph_write_trainable(atmoe_graph *graph,
                                                   const char *name,
                                                   const float *data,
                                                   size_t count);
/* The named weight's gradient as the last compute left it; INVALID_ARGUMENT
 * when the graph is not planned, nothing was computed since, or the
 * gradient's memory is reused during the compute (not an output). */
ATMOE_API atmoe_status atmoe_graph_read_gradient(atmoe_graph *graph,
                                                 const char *name,
                                                 float *data, size_t count);

typedef enum atmoe_optimizer_kind {
    ATMOE_OPTIMIZER_ADAMW, /* Adam with decoupled weight decay */
    ATMOE_OPTIMIZER_SGD    /* with optional heavy-ball momentum */
} atmoe_optimizer_kind;

typedef enum atmoe_schedule {
    ATMOE_SCHEDULE_CONSTANT, /* lr after the warm-up */
    ATMOE_SCHEDULE_COSINE    /* cosine decay from lr to min_lr, from the end
                                of the warm-up to total_steps */
} atmoe_schedule;

/* Every field is read: fill them all, or start from
 * atmoe_optimizer_config_default().  Step t (1, 2, ...) uses the learning
 * rate lr * t / warmup_steps while t <= warmup_steps, then the schedule's
 * (atmoe_optimizer_get_lr).  weight_decay is decoupled (the parameter is
 * multiplied by 1 - lr_t * weight_decay) and applies to every entry, for
 * both kinds. */
typedef struct atmoe_optimizer_config {
    atmoe_optimizer_kind kind;
    float lr;            /* > 0 */
    float beta1, beta2;  /* AdamW: in [0, 1) */
    float eps;           /* AdamW: > 0 */
    float momentum;      /* SGD: in [0, 1); 0 is plain SGD */
    float weight_decay;  /* >= 0 */
    float max_grad_norm; /* > 0: the gradients are scaled so that their
                            global norm over all entries is at most this
                            (as torch.nn.utils.clip_grad_norm_); 0: never */
    atmoe_schedule schedule;
    uint64_t warmup_steps;
    uint64_t total_steps; /* cosine: > warmup_steps; past it, min_lr */
    float min_lr;         /* cosine: in [0, lr] */
    unsigned accumulation; /* micro-batches per step, >= 1 */
} atmoe_optimizer_config;

/* AdamW, lr 1e-3, betas 0.9 and 0.999, eps 1e-8, weight decay 0.01 (the
 * values of torch.optim.AdamW), no clipping, constant schedule without
 * warm-up, one micro-batch per step. */
ATMOE_API atmoe_status atmoe_optimizer_config_default(
    atmoe_optimizer_config *config);

/* An optimiser over every entry of a planned graph's trainable registry
 * (after its backward pass and plan), holding its moments on the device.
 * The graph must outlive it. */
typedef struct atmoe_optimizer atmoe_optimizer;

ATMOE_API atmoe_status atmoe_optimizer_new(
    atmoe_graph *graph, const atmoe_optimizer_config *config,
    atmoe_optimizer **opt);
ATMOE_API void atmoe_optimizer_free(atmoe_optimizer *opt);

/* After the compute of a micro-batch: adds the gradients it left into the
 * optimiser's accumulator on the device.  With accumulation 1 the
 * gradients stay where they are and step reads them there.  OUT_OF_RANGE
 * past `accumulation` micro-batches. */
ATMOE_API atmoe_status atmoe_optimizer_accumulate(atmoe_optimizer *opt);

/* What a step did. */
typedef struct atmoe_optimizer_report {
    uint64_t step;    /* steps taken (skipped ones not counted) */
    uint64_t skipped; /* steps skipped as not finite, in all */
    float lr;         /* used by this step (0 when skipped) */
    float grad_norm;  /* global norm of the mean gradient, before clipping */
    float clip;       /* factor applied to the gradients (1: none) */
} atmoe_optimizer_report;

/* One update with the mean gradient of the micro-batches accumulated since
 * the last step (exactly `accumulation` of them), or, with accumulation 1
 * and no accumulate call, with the gradients of the last compute.  loss is
 * the caller's value of the loss for these micro-batches: when it or the
 * gradient norm is NaN or infinite the step is skipped (NOT_FINITE): the
 * parameters, moments and step count are untouched, the skipped count
 * grows, and the micro-batches are dropped.  report may be NULL.  Waits
 * once, for the gradient norm; allocates nothing on the host. */
ATMOE_API atmoe_status atmoe_optimizer_step(atmoe_optimizer *opt, float loss,
                                            atmoe_optimizer_report *report);

/* The learning rate the schedule gives step `step` (>= 1). */
ATMOE_API atmoe_status atmoe_optimizer_get_lr(const atmoe_optimizer *opt,
                                              uint64_t step, float *lr);

/* A checkpoint: every entry's values ("param/<name>") and moments
 * ("adam_m/<name>", "adam_v/<name>"; SGD with momentum:
 * "sgd_momentum/<name>") as F32, the step and skipped counts and the
 * configuration in the metadata, written atomically.  Refused
 * (INVALID_ARGUMENT) between micro-batches of a step: accumulators are not
 * saved. */
ATMOE_API atmoe_status atmoe_optimizer_save(atmoe_optimizer *opt,
                                            const char *path);
/* Restores a checkpoint of the same graph's entries and optimiser kind, so
 * that training continues bit for bit.  A file that lacks a tensor, holds
 * one more or another kind's (FORMAT_ERROR) or a tensor of another shape
 * (SHAPE_MISMATCH) changes nothing.  The configuration in force stays the
 * optimiser's own. */
ATMOE_API atmoe_status atmoe_optimizer_load(atmoe_optimizer *opt,
                                            const char *path);

/* ------------------------------------------------------------------------ */
/* Clustering                                                                */
/* ------------------------------------------------------------------------ */

/* Instruction embeddings and their k-means clustering on the device, the
 * intuition router's centroids (SPEC section 4).  These calls work on
 * tensors, not graphs: k-means decides between its device passes (random
 * draws, convergence, empty clusters), which a planned graph cannot.  Every
 * matrix is a contiguous f32 tensor; every call is a use of the tensors'
 * context and waits for its result.  The device passes add in a fixed
 * order (no atomics), so a call gives the same bits on the same device
 * every time. */

/* out [N, D] = the mean of tokens [N, L, D] over the positions l whose
 * mask [N, L] (i32; NULL: every position) is not zero.  A row whose mask
 * keeps no token is an INVALID_ARGUMENT naming the row. */
ATMOE_API atmoe_status atmoe_embeddings_pool(atmoe_context *ctx,
                                             const atmoe_tensor *tokens,
                                             const atmoe_tensor *mask,
                                             atmoe_tensor *out);

/* dst [N, D] = each row of src [N, D] over its L2 norm; dst may be src.  A
 * row of zero norm or with a NaN or infinite element is an
 * INVALID_ARGUMENT naming the first such row (dst is then unchanged). */
ATMOE_API atmoe_status atmoe_embeddings_normalize(atmoe_context *ctx,
                                                  const atmoe_tensor *src,
                                                  atmoe_tensor *dst);

/* Where a k-means run stands after a Lloyd iteration. */
typedef struct atmoe_kmeans_progress {
    unsigned restart;   /* from 0 */
    unsigned iteration; /* from 1, within the restart */
    double objective;   /* sum of squared distances to the centroids */
    double change;      /* (previous - objective) / previous */
    size_t reseeded;    /* empty clusters re-seeded in this iteration */
} atmoe_kmeans_progress;

/* Called after every iteration; a non-zero return stops the run, which
 * then returns ATMOE_STATUS_CANCELLED with its outputs unwritten. */
typedef int (*atmoe_kmeans_progress_fn)(const atmoe_kmeans_progress *p,
                                        void *user);

typedef struct atmoe_kmeans_options {
    size_t k;                /* clusters, 1 to N */
    uint64_t seed;           /* of the k-means++ draws */
    unsigned restarts;       /* runs from new seeds, best kept; 0 means 1 */
    unsigned max_iterations; /* Lloyd iterations per run; 0 means 100 */
    double tolerance;        /* stop when the objective's relative decrease
                                is at most this (0: until it stops
                                decreasing) */
    int normalize;           /* L2-normalise the points first (into a copy;
                                zero-norm rows are then an error) */
    int init_given;          /* start from the centroids passed in instead
                                of k-means++ (restarts must be 1; they must
                                be finite) */
    atmoe_kmeans_progress_fn progress; /* may be NULL */
    void *user;
} atmoe_kmeans_options;

typedef struct atmoe_kmeans_result {
    double objective;      /* of the best run */
    unsigned iterations;   /* of the best run */
    unsigned restarts;     /* runs completed */
    unsigned best_restart; /* from 0 */
    size_t reseeded;       /* empty clusters re-seeded in the best run */
    int converged;         /* the best run met the tolerance */
} atmoe_kmeans_result;

/* k-means of points [N, D] into centroids [K, D] (K = options->k), and
 * optionally each point's cluster into assignments (i32 [N], may be NULL).
 * Seeding is k-means++: run r draws from SplitMix64 started at
 * mix(seed + (r + 1) * 0x9e3779b97f4a7c15) (mix being SplitMix64's output
 * function), one uniform u = (draw >> 11) * 2^-53 per centroid: the first
 * is point floor(u N), each next the first point whose running sum of
 * squared distances to the nearest chosen centroid exceeds u times their
 * total.  A Lloyd iteration updates the centroids to the means of their
 * points, re-seeds each empty cluster (in index order) with the point
 * farthest from its centroid not yet taken, and assigns every point to its
 * nearest centroid (lowest index among equals).  Points with a NaN or
 * infinite element are an INVALID_ARGUMENT naming the row.  result may be
 * NULL. */
ATMOE_API atmoe_status atmoe_kmeans(atmoe_context *ctx,
                                    const atmoe_tensor *points,
                                    const atmoe_kmeans_options *options,
                                    atmoe_tensor *centroids,
                                    atmoe_tensor *assignments,
                                    atmoe_kmeans_result *result);

/* Assigns points [N, D] to centroids [K, D]: assignments (i32 [N]) the
 * nearest centroid by squared distance, as atmoe_kmeans does, and scores
 * [N, K] the dot products C e of the intuition router.  Either output may
 * be NULL, not both. */
ATMOE_API atmoe_status atmoe_kmeans_assign(atmoe_context *ctx,
                                           const atmoe_tensor *centroids,
                                           const atmoe_tensor *points,
                                           atmoe_tensor *assignments,
                                           atmoe_tensor *scores);

/* Writes centroids [K, D] to a safetensors file at path as the F32 tensor
 * "centroids", with the objective (NaN: none) in the metadata key
 * "objective" as a decimal string; atomically, like every writer. */
ATMOE_API atmoe_status atmoe_centroids_save(const atmoe_tensor *centroids,
                                            double objective,
                                            const char *path);

/* Reads the tensor "centroids" [K, D] (any float dtype) of the safetensors
 * file at path into a new f32 tensor of ctx; *objective (may be NULL)
 * receives the metadata's objective, NaN when the file has none. */
ATMOE_API atmoe_status atmoe_centroids_load(atmoe_context *ctx,
                                            const char *path,
                                            atmoe_tensor **centroids,
                                            double *objective);

/* ------------------------------------------------------------------------ */
/* Training recipes                                                          */
/* ------------------------------------------------------------------------ */

/* The recipes of the papers as library calls, from data on disk to files
 * that PEFT, a manifest and atmoe run take as they are.  A training set is
 * a safetensors file: x [N, d_in] (F32, F16, BF16 or F64: the hidden states
 * entering the manifest's stack), y [N, d_out] regression targets, and for
 * stage 1 task [N] (I32).  Rows are shuffled by seed (SplitMix64, a
 * Fisher-Yates pass each time the rows are used up), cut into micro-batches
 * of `batch` rows (the last of a pass shorter), `accumulation` of them per
 * optimiser step.  NaN or infinite data is NOT_FINITE naming the row.  An
 * optional held-out split, x_heldout, y_heldout (and task_heldout for
 * stage 1) checked as the rest, is never trained on: the trained model's
 * loss over it is reported (atmoe_train_progress).
 *
 * A step whose loss or gradient is not finite is skipped (the optimiser's
 * NOT_FINITE) and training goes on; progress counts the skipped steps.  A
 * model trained from its start (not resumed from a checkpoint) must have
 * trained, else the recipe fails and writes nothing: NOT_FINITE when every
 * step was skipped or the trained loss is not finite, NO_PROGRESS when the
 * trained loss over all its rows is not below the loss of the weights it
 * started from over the same rows (measured before the first step, one
 * more pass over them) by at least 1e-4 of it.  Both messages give the two losses or the first
 * skip's cause. */

/* Where a recipe stands, given to the progress callback after every step
 * and once when a model is done. */
typedef struct atmoe_train_progress {
    size_t model, models;  /* the model being trained, from 0, of models */
    const char *adapter;   /* its adapter directory (stage 1) */
    uint64_t step, steps;  /* optimiser steps taken, of steps */
    float loss;            /* the step's mean loss; with done, the mean MSE
                              of the trained model over all its rows */
    float lr, grad_norm;   /* of the step (0 with done) */
    double tokens_per_second; /* rows trained on per second of wall time */
    double seconds;        /* since the model's training began */
    int done;              /* 1: the model's training has ended */
    float heldout_loss;    /* with done: the mean loss over the model's
                              held-out rows; NaN without them */
    uint64_t skipped;      /* steps skipped as not finite so far (the
                              optimiser's count, a resumed run's included);
                              a skipped step's loss is the one it met */
    float initial_loss;    /* the mean loss over all the model's rows
                              before its first step; NaN when resumed */
} atmoe_train_progress;

/* A non-zero return stops the recipe at that step boundary: it returns
 * ATMOE_STATUS_CANCELLED and writes nothing.  The return of the done call
 * is ignored. */
typedef int (*atmoe_train_progress_fn)(const atmoe_train_progress *p,
                                       void *user);

/* Every field is read: fill them all, or start from
 * atmoe_train_config_default(). */
typedef struct atmoe_train_config {
    atmoe_optimizer_config optimizer; /* a cosine schedule's total_steps of
                                         0 means the recipe's steps */
    uint64_t steps;  /* optimiser steps per model; 0: from epochs */
    unsigned epochs; /* passes over the model's rows when steps is 0 (the
                        steps rounded up) */
    size_t batch;    /* rows per micro-batch, >= 1 */
    uint64_t seed;   /* of the shuffles */
    atmoe_train_progress_fn progress; /* may be NULL */
    void *user;
    /* Checkpoints (atmoe_optimizer_save, atomic) at this path, with
     * ".<model>" appended when a recipe trains several models; NULL: none.
     * Written every checkpoint_every steps (0: never on a schedule), at a
     * model's last step, and when the callback stops the recipe.  With
     * resume, a model whose checkpoint exists continues from it (its
     * shuffles replayed), ending with the parameters bit for bit of a run
     * that was not interrupted. */
    const char *checkpoint;
    uint64_t checkpoint_every;
    int resume;
} atmoe_train_config;

/* The optimiser's defaults (atmoe_optimizer_config_default), one epoch,
 * batches of 32 rows, seed 0, no callback. */
ATMOE_API atmoe_status atmoe_train_config_default(atmoe_train_config *config);

/* AT-MoE's stage 1: every adapter directory the manifest names (its
 * models, in the order they first appear, layer by layer, module by
 * module, experts before the general LoRA) is trained as a plain LoRA
 * over the stack, base weights frozen: y = the stack with, in each layer's
 * output module, W0 x + bias + s B A x where the model has a target there
 * and W0 x + bias where it has none; MSE against y.  Expert adapters
 * number the tasks 0, 1, ... in that order and train on the rows of their
 * task; a general LoRA trains on every row.  Each model starts from the
 * values its adapter holds (PEFT's own initialisation: A random, B zero)
 * and is written, once all are trained, to output/<its directory's name>
 * (created; the directory output is created when missing, not its
 * parents) as a PEFT adapter in F32, with every target of the input
 * adapter, those of output modules trained.  Modules that do not feed the
 * next layer are not in the loss's path; their targets are copied.
 *
 * Refused: a manifest with rank-1 modules (NOT_SUPPORTED), an adapter that
 * is both an expert and a general LoRA or adapts no output module, two
 * adapters whose directories share a name (INVALID_ARGUMENT), data widths
 * other than the manifest's (SHAPE_MISMATCH), a task id outside the
 * experts' (OUT_OF_RANGE), a task with no rows (INVALID_ARGUMENT), NaN or
 * infinite data (NOT_FINITE, naming the row).  On failure nothing is
 * written: an output directory that did not exist is built under a
 * temporary name beside it and renamed into place once complete (one
 * that exists has its files replaced one by one, each atomically). */
ATMOE_API atmoe_status atmoe_train_stage1(atmoe_context *ctx,
                                          atmoe_manifest *manifest,
                                          const char *data,
                                          const atmoe_train_config *config,
                                          const char *output);

/* AT-MoE's stage 2: the experts and the base frozen, the routers (w_g and
 * w_d, or v_d with the scaled form) of every layer's output module trained
 * on the mixed rows x [N, d_in], y [N, d_out] of data (MSE on the stack's
 * output, each token routed by its hidden state; a router the manifest
 * leaves out starts from zeros: uniform weights).  Routers of modules
 * that do not feed the next layer are not on the loss's path and are
 * copied.  Once trained, output (created when missing) receives
 * router.safetensors, tensors "layers.<layer>.<module>.w_g" and ".w_d"
 * (".v_d") F32, then manifest.json: the manifest with its routers there
 * and every other path made absolute, which atmoe run applies as it is.
 * *final_loss (may be NULL) receives the trained stack's mean loss over
 * all the rows, the one atmoe run of that manifest reproduces.  Refused
 * as stage 1 refuses bad data; on failure nothing is written. */
ATMOE_API atmoe_status atmoe_train_stage2(atmoe_context *ctx,
                                          atmoe_manifest *manifest,
                                          const char *data,
                                          const atmoe_train_config *config,
                                          const char *output,
                                          double *final_loss);

/* T-REX: the rank-1 experts of the stack's output modules (A, B, W_r,
 * w_om and w_c: atmoe_graph_mor1e_layer) trained jointly from the values
 * the manifest gives (absent W_r, w_om, w_c: zeros, the reference
 * initialisation; atmoe_mor1e_init makes A and B), the base and any
 * AT-MoE module frozen, on every row of data: x [N, d_in], y [N, d_out],
 * sample [N] (I32: each row's sample) and scores [S, K], the samples'
 * intuition scores (atmoe cluster --assign writes them), or instead
 * embeddings [S, D], the samples' instruction embeddings, L2-normalised
 * and scored against the manifest's centroids in the graph as
 * atmoe_manifest_build_with does (scores win when both are there), with
 * sample_heldout beside a held-out split.  Embeddings without centroids in
 * the manifest (INVALID_ARGUMENT), of another D than theirs
 * (SHAPE_MISMATCH), with a row of norm 0 (INVALID_ARGUMENT) or not finite
 * (NOT_FINITE) are refused, the row named.  Output (created when missing)
 * receives trex.safetensors, tensors "layers.<layer>.<module>.a", ".b",
 * ".w_r", ".w_om", ".w_c" F32, then manifest.json, which atmoe run
 * applies to inputs holding the same scores (or embeddings) and
 * gate_index.  *final_loss
 * (may be NULL) as atmoe_train_stage2 gives it. */
ATMOE_API atmoe_status atmoe_train_trex(atmoe_context *ctx,
                                        atmoe_manifest *manifest,
                                        const char *data,
                                        const atmoe_train_config *config,
                                        const char *output,
                                        double *final_loss);

#ifdef __cplusplus
}
#endif

#endif /* ATMOE_H */

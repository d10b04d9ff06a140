#include <config.h>

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "base/error.h"
#include "base/log.h"

/* Messages of the calls a thread makes without a context. */
static _Thread_local atm_errsink thread_sink;

static const char *const status_names[] = {
#define ATM_STATUS_NAME_(name, text) #name,
    ATMOE_STATUS_MAP(ATM_STATUS_NAME_)
#undef ATM_STATUS_NAME_
};

static const char *const status_texts[] = {
#define ATM_STATUS_TEXT_(name, text) text,
    ATMOE_STATUS_MAP(ATM_STATUS_TEXT_)
#undef ATM_STATUS_TEXT_
};

ATMOE_API const char *atmoe_strerror(atmoe_status status)
{
    if ((unsigned)status >= ATMOE_STATUS_COUNT_)
        return ATM_UNKNOWN_NAME;
    return status_texts[status];
}

ATMOE_API const char *atmoe_status_name(atmoe_status status)
{
    if ((unsigned)status >= ATMOE_STATUS_COUNT_)
        return ATM_UNKNOWN_NAME;
    return status_names[status];
}

atm_errsink *atm_errsink_thread(void)
{
    return &thread_sink;
}

atmoe_status atm_errsink_vfail(atm_errsink *sink, atmoe_status status,
                               const char *fmt, va_list ap)
{
    vsnprintf(sink->text, sizeof sink->text, fmt, ap);
    atm_log(ATMOE_LOG_DEBUG, "%s: %s", atmoe_status_name(status), sink->text);
    return status;
}

atmoe_status atm_errsink_fail(atm_errsink *sink, atmoe_status status,
                              const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    atm_errsink_vfail(sink, status, fmt, ap);
    va_end(ap);
    return status;
}

atmoe_status atm_cl_status(cl_int err)
{
    if (err == CL_MEM_OBJECT_ALLOCATION_FAILURE || err == CL_OUT_OF_RESOURCES ||
        err == CL_INVALID_BUFFER_SIZE)
        return ATMOE_STATUS_DEVICE_OUT_OF_MEMORY;
    if (err == CL_OUT_OF_HOST_MEMORY)
        return ATMOE_STATUS_HOST_OUT_OF_MEMORY;
    return ATMOE_STATUS_OPENCL_ERROR;
}

const char *atm_cl_error_name(cl_int err)
{
    switch (err) {
#define ATM_CL_ERR_(e) case e: return #e;
    ATM_CL_ERR_(CL_SUCCESS)
    ATM_CL_ERR_(CL_DEVICE_NOT_FOUND)
    ATM_CL_ERR_(CL_DEVICE_NOT_AVAILABLE)
    ATM_CL_ERR_(CL_COMPILER_NOT_AVAILABLE)
    ATM_CL_ERR_(CL_MEM_OBJECT_ALLOCATION_FAILURE)
    ATM_CL_ERR_(CL_OUT_OF_RESOURCES)
    ATM_CL_ERR_(CL_OUT_OF_HOST_MEMORY)
    ATM_CL_ERR_(CL_PROFILING_INFO_NOT_AVAILABLE)
    ATM_CL_ERR_(CL_MEM_COPY_OVERLAP)
    ATM_CL_ERR_(CL_IMAGE_FORMAT_MISMATCH)
    ATM_CL_ERR_(CL_IMAGE_FORMAT_NOT_SUPPORTED)
    ATM_CL_ERR_(CL_BUILD_PROGRAM_FAILURE)
    ATM_CL_ERR_(CL_MAP_FAILURE)
    ATM_CL_ERR_(CL_MISALIGNED_SUB_BUFFER_OFFSET)
    ATM_CL_ERR_(CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST)
    ATM_CL_ERR_(CL_COMPILE_PROGRAM_FAILURE)
    ATM_CL_ERR_(CL_LINKER_NOT_AVAILABLE)
    ATM_CL_ERR_(CL_LINK_PROGRAM_FAILURE)
    ATM_CL_ERR_(CL_DEVICE_PARTITION_FAILED)
    ATM_CL_ERR_(CL_KERNEL_ARG_INFO_NOT_AVAILABLE)
    ATM_CL_ERR_(CL_INVALID_VALUE)
    ATM_CL_ERR_(CL_INVALID_DEVICE_TYPE)
    ATM_CL_ERR_(CL_INVALID_PLATFORM)
    ATM_CL_ERR_(CL_INVALID_DEVICE)
    ATM_CL_ERR_(CL_INVALID_CONTEXT)
    ATM_CL_ERR_(CL_INVALID_QUEUE_PROPERTIES)
    ATM_CL_ERR_(CL_INVALID_COMMAND_QUEUE)
    ATM_CL_ERR_(CL_INVALID_HOST_PTR)
    ATM_CL_ERR_(CL_INVALID_MEM_OBJECT)
    ATM_CL_ERR_(CL_INVALID_IMAGE_FORMAT_DESCRIPTOR)
    ATM_CL_ERR_(CL_INVALID_IMAGE_SIZE)
    ATM_CL_ERR_(CL_INVALID_SAMPLER)
    ATM_CL_ERR_(CL_INVALID_BINARY)
    ATM_CL_ERR_(CL_INVALID_BUILD_OPTIONS)
    ATM_CL_ERR_(CL_INVALID_PROGRAM)
    ATM_CL_ERR_(CL_INVALID_PROGRAM_EXECUTABLE)
    ATM_CL_ERR_(CL_INVALID_KERNEL_NAME)
    ATM_CL_ERR_(CL_INVALID_KERNEL_DEFINITION)
    ATM_CL_ERR_(CL_INVALID_KERNEL)
    ATM_CL_ERR_(CL_INVALID_ARG_INDEX)
    ATM_CL_ERR_(CL_INVALID_ARG_VALUE)
    ATM_CL_ERR_(CL_INVALID_ARG_SIZE)
    ATM_CL_ERR_(CL_INVALID_KERNEL_ARGS)
    ATM_CL_ERR_(CL_INVALID_WORK_DIMENSION)
    ATM_CL_ERR_(CL_INVALID_WORK_GROUP_SIZE)
    ATM_CL_ERR_(CL_INVALID_WORK_ITEM_SIZE)
    ATM_CL_ERR_(CL_INVALID_GLOBAL_OFFSET)
    ATM_CL_ERR_(CL_INVALID_EVENT_WAIT_LIST)
    ATM_CL_ERR_(CL_INVALID_EVENT)
    ATM_CL_ERR_(CL_INVALID_OPERATION)
    ATM_CL_ERR_(CL_INVALID_GL_OBJECT)
    ATM_CL_ERR_(CL_INVALID_BUFFER_SIZE)
    ATM_CL_ERR_(CL_INVALID_MIP_LEVEL)
    ATM_CL_ERR_(CL_INVALID_GLOBAL_WORK_SIZE)
    ATM_CL_ERR_(CL_INVALID_PROPERTY)
    ATM_CL_ERR_(CL_INVALID_IMAGE_DESCRIPTOR)
    ATM_CL_ERR_(CL_INVALID_COMPILER_OPTIONS)
    ATM_CL_ERR_(CL_INVALID_LINKER_OPTIONS)
    ATM_CL_ERR_(CL_INVALID_DEVICE_PARTITION_COUNT)
#undef ATM_CL_ERR_
    case -1001: return "CL_PLATFORM_NOT_FOUND_KHR";
    default: return "unknown OpenCL error";
    }
}

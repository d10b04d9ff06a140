/* The process-wide list of OpenCL devices, enumerated once. */
#ifndef ATMOE_DEVICE_H
#define ATMOE_DEVICE_H

#include "base/error.h"

typedef struct atm_device {
    cl_platform_id platform;
    cl_device_id id;
    atmoe_device_info info;
} atm_device;

/* The device at index, or NULL (with a message for ctx-less callers) when
 * the index is past the list. */
atmoe_status atm_device_lookup(size_t index, const atm_device **device);

#endif

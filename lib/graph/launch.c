/* Launching an operation's kernels: the handles a node keeps from planning
 * on, their arguments in order, and the 1-D launches most operations use. */
#include <config.h>

#include "device/program.h"
#include "graph/graph.h"

atmoe_status atm_node_kernel(atmoe_graph *g, atm_node *n, int slot,
                             const char *program, const char *options,
                             const char *kernel)
{
    return atm_kernel_get(g->ctx, program, options ? options : "", kernel,
                          &n->kernel[slot]);
}

void atm_arg(atm_args *a, size_t size, const void *value)
{
    cl_int err = clSetKernelArg(a->k, a->next++, size, value);
    if (a->err == CL_SUCCESS)
        a->err = err;
}

void atm_arg_tensor(atm_args *a, const atmoe_tensor *t)
{
    cl_ulong off = t->offset;
    atm_arg(a, sizeof t->buffer, &t->buffer);
    atm_arg(a, sizeof off, &off);
}

void atm_arg_buffer(atm_args *a, cl_mem buffer)
{
    atm_arg(a, sizeof buffer, &buffer);
}

void atm_arg_ulong(atm_args *a, cl_ulong v)
{
    atm_arg(a, sizeof v, &v);
}

void atm_arg_int(atm_args *a, cl_int v)
{
    atm_arg(a, sizeof v, &v);
}

void atm_arg_float(atm_args *a, cl_float v)
{
    atm_arg(a, sizeof v, &v);
}

atmoe_status atm_node_launch(atmoe_graph *g, const atm_node *n, atm_args *a,
                             const char *kernel, size_t work_items,
                             cl_event *ev)
{
    return atm_node_launch_local(g, n, a, kernel, work_items, 64, ev);
}

atmoe_status atm_node_launch_local(atmoe_graph *g, const atm_node *n,
                                   atm_args *a, const char *kernel,
                                   size_t work_items, size_t local,
                                   cl_event *ev)
{
    if (a->err != CL_SUCCESS)
        return atm_fail(g->ctx, ATMOE_STATUS_OPENCL_ERROR,
                        "clSetKernelArg(%s) for node '%s' failed: %s (%d)",
                        kernel, n->name, atm_cl_error_name(a->err),
                        (int)a->err);
    return atm_launch_1d_local(g->ctx, a->k, work_items, local, kernel, ev);
}

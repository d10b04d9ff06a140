/* What the rest of lib/io reads of a PEFT adapter beyond the public API. */
#ifndef ATMOE_ADAPTER_H
#define ATMOE_ADAPTER_H

#include "atmoe.h"

/* The types target index's A and B are stored in (F32 for the host
 * copies atmoe_adapter_set gave). */
atmoe_status atm_adapter_stored_dtypes(const atmoe_adapter *adapter,
                                       size_t index,
                                       atmoe_safetensors_dtype *a,
                                       atmoe_safetensors_dtype *b);

#endif

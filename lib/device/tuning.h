/* Tuned kernel parameters kept as data: a JSON database of entries keyed by
 * device, vendor, type and driver, each holding CLBlast kernel parameter
 * sets ("clblast": kernel -> name -> value) and defines for the library's
 * own programs ("kernels": program -> name -> value).
 *
 * Two copies are read: the system one installed with the library
 * ($(pkgdatadir)/tuning.json, or ATMOE_TUNING_SYSTEM_FILE) and the user's
 * ($ATMOE_TUNING_FILE, else $XDG_DATA_HOME/atmoe/tuning.json, else
 * $HOME/.local/share/atmoe/tuning.json).  A user entry replaces the system
 * entry with the same key.  For every kernel, the most specific entry that
 * lists it wins: device and driver, then the device under any driver, then
 * the vendor and device type -- the order CLBlast's own database uses.
 *
 * A file that cannot be read as a database is logged as a warning and
 * ignored as a whole, so that a hand edit gone wrong never stops the
 * library; atmoe_tuning_check() says what is wrong with it.
 *
 * CLBlast keeps parameter overrides per OpenCL device for the whole process
 * (CLBlastOverrideParameters), not per context, and offers no way back to
 * its built-in values: once a context has applied a set, every context on
 * that device uses it until another set replaces it. */
#ifndef ATMOE_TUNING_H
#define ATMOE_TUNING_H

#include "device/context.h"

/* Applies the tuned parameters at context creation, unless ATMOE_PARAMS
 * says "default".  Never fails: problems are logged and tuning is then
 * partly or wholly skipped. */
void atm_tuning_init(atmoe_context *ctx);

/* Releases what atm_tuning_init kept in the context. */
void atm_tuning_release(atmoe_context *ctx);

/* An integer of program `program`'s defines in the "kernels" section in
 * force for ctx, or fallback.  Callers whose launch geometry depends on a
 * define read it here and pass it in their options themselves. */
long atm_tuning_kernel_value(const atmoe_context *ctx, const char *program,
                             const char *key, long fallback);

/* options followed by the defines of program `name` from the "kernels"
 * section in force for ctx, less those options define already (the
 * caller's values win): *out receives a malloc'd string, or NULL when
 * the program has no defines and options stand as they are (no allocation
 * on that path, which every kernel lookup takes).  -1 when out of host
 * memory. */
int atm_tuning_build_options(const atmoe_context *ctx, const char *name,
                             const char *options, char **out);

#endif

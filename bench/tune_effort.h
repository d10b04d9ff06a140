/* atmoe-tune --effort: the whole search of a device (or of every device)
 * as a list of steps, each one atmoe-tune run of one phase in a child
 * process, with a checkpoint after each (see tune_effort.c). */
#ifndef ATMOE_BENCH_TUNE_EFFORT_H
#define ATMOE_BENCH_TUNE_EFFORT_H

#include <stddef.h>

#include <jansson.h>

typedef struct effort_args {
    const char *self;   /* argv[0] of the tuner, to run the steps */
    const char *effort; /* test, quick, normal or exhaustive */
    const char *device; /* NULL: the default device */
    int all_devices;    /* every OpenCL device present, one after another */
    const char *output; /* the database the steps write */
    unsigned long seed;
    int cpu_clock;
    int resume; /* continue from the checkpoint next to output */
    int quiet;
} effort_args;

/* 1 when name is an effort --effort takes. */
int effort_known(const char *name);

/* Runs the steps; 0 when every step ran or was skipped, EXIT_RUNTIME (1)
 * when nothing could be tuned or saved. */
int tune_effort(const effort_args *a);

/* In a step's child: the test-only knob ATMOE_TUNE_TEST_HANG=STEP (or
 * ATMOE_TUNE_TEST_CRASH=STEP) makes the step named STEP hang (or crash),
 * so that the driver's timeout and skip can be tested. */
void effort_test_knob(const char *step);

/* The journal of candidates, in a step's child: the --effort driver runs
 * each step with --journal (its checkpoint), and the child writes there
 * the candidate it is about to run ("running"), and clears it after.  When
 * the child dies by a signal, or is killed at its candidate's or step's
 * time limit, the driver records that candidate ("candidates", with
 * result "crashed" or "timed out") and runs the step again, which then
 * skips it.  key names the step ("DEVICE STEP"), path NULL: no journal
 * (a run outside --effort), where the test knobs below still work. */
void journal_open(const char *path, const char *device, const char *step);

/* Before a candidate (label: its values, as the progress lines show
 * them): 1 when an earlier run of this step lost it, with what happened
 * ("crashed", "timed out") in why, and it is to be skipped; else 0, the
 * candidate journalled.  The test-only knobs
 * ATMOE_TUNE_TEST_CANDIDATE_CRASH=STEP:N and
 * ATMOE_TUNE_TEST_CANDIDATE_HANG=STEP:N make the step's Nth candidate (in
 * its order, skipped ones counted) abort or hang here. */
int journal_begin(const char *label, char *why, size_t size);
void journal_end(void);

/* The candidates of this step that earlier runs lost, as an array of
 * {"candidate", "result"} (a new reference), or NULL when there are
 * none. */
json_t *journal_lost(void);

#endif

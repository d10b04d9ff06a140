/* atmoe-tune --effort: the whole search of a device (or of every device)
 * as a list of steps, each one atmoe-tune run of one phase in a child
 * process, with a checkpoint after each (see tune_effort.c). */
#ifndef ATMOE_BENCH_TUNE_EFFORT_H
#define ATMOE_BENCH_TUNE_EFFORT_H

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

#endif

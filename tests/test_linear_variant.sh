#!/bin/sh
# The mixture suites again with the linear route's group variant forced
# (ATMOE_LINEAR_VARIANT=1: cl/linear_gpu.cl, the default on GPUs), so that
# a CPU device checks it over every route, batch and storage type that
# tests/test_moe, test_moe_layer and test_mor1e cover against their float64
# references.  Exit 77 (a skip) when there is no OpenCL device, as theirs.
set -u
ATMOE_LINEAR_VARIANT=1
export ATMOE_LINEAR_VARIANT
status=0
for t in ./tests/test_moe ./tests/test_moe_layer ./tests/test_mor1e; do
    echo "$t with ATMOE_LINEAR_VARIANT=1"
    "$t"
    rc=$?
    if [ "$rc" -eq 77 ]; then
        [ "$status" -eq 0 ] && status=77
    elif [ "$rc" -ne 0 ]; then
        echo "FAIL: $t with the group variant exited $rc"
        status=1
    fi
done
exit "$status"

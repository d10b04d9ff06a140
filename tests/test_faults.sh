#!/bin/sh
# The fault-injection suite (issue 16).  Each hostile condition must end
# with an exit status and a message, never a hang, a signal or a leak:
#
#  1. OpenCL failures: tests/fault/clshim.so, preloaded, fails the Nth
#     OpenCL call of tests/fault/scenario (context creation, planning, an
#     AT-MoE layer's compute, a manifest run, a tuning run), swept over N
#     (every N up to FAULT_MAX_RUNS runs a scenario, strided past that;
#     FAULT_MAX_RUNS=0 sweeps every N), once failing that call alone and
#     at a stride failing every call from it on; the shim's count of
#     objects never released must be zero (CLBlast's own program cache
#     excepted, which lives as long as the process).  Then the same for
#     `atmoe run` itself, which must also write its output and trace both
#     or neither.
#  2. Host allocations: ATMOE_TEST_FAIL_ALLOC=N over the same scenarios.
#  3. FIFOs at every path the library reads, under a timeout.
#  4. A group-writable and a foreign cache directory; corrupt cache
#     entries; a forged one (valid header and checksum over another
#     binary) owned by another user, which PoCL would abort on.
#  5. A full file system (a 64 KiB tmpfs; root only, skipped otherwise).
#  6. kill -9 during atmoe run and during tuning saves: the old file or
#     the whole new one, and the next save removes the killed writer's
#     temporary.
# Exit 77 (a skip for automake's harness) when there is no OpenCL device.
set -u

scenario=./tests/fault/scenario
shim=$(pwd)/tests/fault/.libs/clshim.so
atmoe=./tools/atmoe
tune=./bench/atmoe-tune
srcdir=${srcdir:-.}
fx=$(cd "$srcdir/tests/fixtures" && pwd) || exit 99
m="$fx/manifest"
max_runs=${FAULT_MAX_RUNS:-20}

# shellcheck source=tests/testlib.sh
. "$(dirname "$0")/testlib.sh"
begin faults
skip_without_device "$atmoe" devices
[ -f "$shim" ] || { echo "no $shim: run make check"; exit 99; }
mkdir -p "$tmp/tune"

# scenario_args NAME: the arguments of scenario NAME.
scenario_args() {
    case $1 in
    manifest) echo "manifest $m/manifest.json $m/x.safetensors" ;;
    tune) echo "tune $tmp/tune" ;;
    *) echo "$1" ;;
    esac
}

# Leaks in a report line other than CLBlast's program cache.
leaks_of() {
    tr ' ' '\n' < "$1" | grep '^leak:' | grep -v '^leak:program@clblast=' |
        tr '\n' ' '
}

# check_run WHAT: the last run ($rc, $tmp/err, $tmp/rep) ended well: 0, or
# 1 with a status and a message, and released what it made.
check_run() {
    case $rc in
    0) ;;
    1)
        if ! grep -q "^scenario [a-z]*: .*: [A-Z_]*: ." "$tmp/err" ||
            grep -q "(no message)" "$tmp/err"; then
            fail "$1: exit 1 without a status and a message"
            cat "$tmp/err"
        fi ;;
    *)
        fail "$1: exit status $rc (a signal or an abort)"
        tail -5 "$tmp/err" ;;
    esac
    if [ -f "$tmp/rep" ]; then
        l=$(leaks_of "$tmp/rep")
        [ -z "$l" ] || fail "$1: OpenCL objects never released: $l"
    fi
}

# run_scenario NAME [VAR=VALUE...]: runs it preloaded with the shim.
run_scenario() {
    name=$1
    shift
    rm -f "$tmp/rep"
    # shellcheck disable=SC2046 # the arguments are split on purpose
    env LD_PRELOAD="$shim" CLSHIM_REPORT="$tmp/rep" "$@" \
        "$scenario" $(scenario_args "$name") > "$tmp/out" 2> "$tmp/err"
    rc=$?
}

# points TOTAL [MAX]: the N to sweep, 1..TOTAL, strided to about MAX
# (max_runs unless given) runs.
points() {
    step=1
    most=${2:-$max_runs}
    if [ "$most" -gt 0 ] && [ "$1" -gt "$most" ]; then
        step=$((($1 + most - 1) / most))
    fi
    n=1
    while [ "$n" -le "$1" ]; do
        echo "$n"
        n=$((n + step))
    done
}

runs=0
for s in context plan layer manifest tune; do
    # --- 1. OpenCL calls
    run_scenario "$s"
    check_run "$s without faults"
    [ "$rc" -eq 0 ] || continue
    calls=$(sed -n 's/^calls=\([0-9]*\).*/\1/p' "$tmp/rep")
    for n in $(points "$calls"); do
        run_scenario "$s" CLSHIM_FAIL_AT="$n"
        check_run "$s, OpenCL call $n of $calls failing"
        runs=$((runs + 1))
    done
    for n in $(points "$calls" | awk 'NR % 4 == 2'); do
        run_scenario "$s" CLSHIM_FAIL_AT="$n" CLSHIM_PERSIST=1
        check_run "$s, OpenCL calls $n..$calls failing"
        runs=$((runs + 1))
    done
    # --- 2. host allocations
    run_scenario "$s" SCENARIO_COUNT=1
    allocs=$(sed -n 's/^allocations \([0-9]*\)$/\1/p' "$tmp/out")
    for n in $(points "$allocs"); do
        run_scenario "$s" ATMOE_TEST_FAIL_ALLOC="$n"
        check_run "$s, host allocation $n of $allocs failing"
        runs=$((runs + 1))
    done
    echo "$s: $calls OpenCL calls, $allocs host allocations swept"
done
# The same through the atmoe command: a manifest run, writing its output
# and trace, fails with exit status 1 and a message, writes both or
# neither, and releases everything.
cli_run() {
    rm -f "$tmp/rep" "$tmp/cy.safetensors" "$tmp/ct.safetensors"
    env LD_PRELOAD="$shim" CLSHIM_REPORT="$tmp/rep" "$@" "$atmoe" run \
        "$m/manifest.json" --input "$m/x.safetensors" \
        --output "$tmp/cy.safetensors" --trace "$tmp/ct.safetensors" \
        > "$tmp/out" 2> "$tmp/err"
    rc=$?
}
cli_run
[ "$rc" -eq 0 ] || fail "atmoe run under the shim exited $rc"
calls=$(sed -n 's/^calls=\([0-9]*\).*/\1/p' "$tmp/rep")
for n in $(points "$calls" $((max_runs / 2))); do
    cli_run CLSHIM_FAIL_AT="$n"
    what="atmoe run, OpenCL call $n of $calls failing"
    case $rc in
    0) [ -f "$tmp/cy.safetensors" ] && [ -f "$tmp/ct.safetensors" ] ||
        fail "$what: exit 0 without both files" ;;
    1) grep -q "^atmoe[ :]" "$tmp/err" || fail "$what: exit 1 without a message"
       [ -e "$tmp/cy.safetensors" ] || [ -e "$tmp/ct.safetensors" ] &&
           fail "$what: a failed run left a file" ;;
    *) fail "$what: exit status $rc (a signal or an abort)" ;;
    esac
    l=$(leaks_of "$tmp/rep")
    [ -z "$l" ] || fail "$what: OpenCL objects never released: $l"
    runs=$((runs + 1))
done
echo "fault sweeps: $runs runs"

# --- 3. FIFOs wherever the library reads: an answer, not a hang
mkfifo "$tmp/fifo"
to="timeout 60"
ATMOE_TUNING_FILE="$tmp/fifo" $to "$atmoe" params > "$tmp/out" 2> "$tmp/err"
rc=$?
[ "$rc" -eq 0 ] || fail "atmoe params with a FIFO as ATMOE_TUNING_FILE exited $rc"
ATMOE_TUNING_SYSTEM_FILE="$tmp/fifo" $to "$atmoe" params > "$tmp/out" 2> "$tmp/err"
rc=$?
[ "$rc" -eq 0 ] || fail "atmoe params with a FIFO as the system database exited $rc"
$to "$tune" --check "$tmp/fifo" > "$tmp/out" 2> "$tmp/err"
rc=$?
expect 1 "not a regular file" "atmoe-tune --check of a FIFO"
tool=$atmoe
to_run() { $to "$atmoe" "$@" > "$tmp/out" 2> "$tmp/err"; rc=$?; }
to_run run "$tmp/fifo" --input "$m/x.safetensors" --output "$tmp/y.safetensors"
expect 1 "not a regular file" "atmoe run of a FIFO manifest"
to_run run "$m/manifest.json" --input "$tmp/fifo" --output "$tmp/y.safetensors"
expect 1 "not a regular file" "atmoe run of a FIFO input"
to_run inspect "$tmp/fifo"
expect 1 "not a regular file" "atmoe inspect of a FIFO"
for f in adapter_config.json adapter_model.safetensors; do
    mkdir -p "$tmp/ad-$f"
    cp "$fx/peft/code/"* "$tmp/ad-$f/"
    rm "$tmp/ad-$f/$f"
    mkfifo "$tmp/ad-$f/$f"
    to_run inspect "$tmp/ad-$f"
    expect 1 "not a regular file" "atmoe inspect of an adapter whose $f is a FIFO"
done
# A kernel source and every cache entry.
mkdir "$tmp/kernels" "$tmp/cache"
mkfifo "$tmp/kernels/tensor.cl"
run_scenario context ATMOE_KERNEL_DIR="$tmp/kernels"
expect 1 "IO_ERROR" "a FIFO as ATMOE_KERNEL_DIR/tensor.cl" err
run_scenario context ATMOE_CACHE_DIR="$tmp/cache"
check_run "filling a fresh cache"
for b in "$tmp/cache"/*.bin; do
    rm "$b"
    mkfifo "$b"
done
ATMOE_CACHE_DIR="$tmp/cache" $to env "$scenario" context > "$tmp/out" 2> "$tmp/err"
rc=$?
check_run "a cache of FIFOs"
[ "$rc" -eq 0 ] || fail "a cache of FIFOs: exit $rc"

# --- 4. cache directories and entries nobody should trust
entries() { find "$1" -name '*.bin' -type f | wc -l; }
mkdir -m 0777 "$tmp/open"
chmod 0777 "$tmp/open"
run_scenario context ATMOE_CACHE_DIR="$tmp/open"
check_run "a world-writable cache directory"
[ "$(entries "$tmp/open")" -eq 0 ] || fail "a world-writable cache directory was used"
chmod 0770 "$tmp/open"
run_scenario context ATMOE_CACHE_DIR="$tmp/open"
[ "$(entries "$tmp/open")" -eq 0 ] || fail "a group-writable cache directory was used"
if [ "$(id -u)" -eq 0 ]; then
    mkdir -m 0700 "$tmp/theirs"
    chown 65534 "$tmp/theirs"
    run_scenario context ATMOE_CACHE_DIR="$tmp/theirs"
    check_run "another user's cache directory"
    [ "$(entries "$tmp/theirs")" -eq 0 ] || fail "another user's cache directory was used"
else
    echo "SKIP (not root): another user's cache directory"
fi
rm -rf "$tmp/cache"
mkdir -m 0700 "$tmp/cache"
run_scenario layer ATMOE_CACHE_DIR="$tmp/cache"
check_run "filling the cache for the layer"
# Corrupt: bytes flipped in the middle of every entry.
for b in "$tmp/cache"/*.bin; do
    python3 - "$b" <<'EOF'
import sys
p = sys.argv[1]
d = bytearray(open(p, 'rb').read())
for i in range(len(d) // 2, len(d) // 2 + 16):
    d[i] ^= 0xFF
open(p, 'wb').write(d)
EOF
done
run_scenario layer ATMOE_CACHE_DIR="$tmp/cache"
check_run "a cache of corrupt entries"
[ "$rc" -eq 0 ] || fail "a cache of corrupt entries: exit $rc"
# Forged: another binary behind a header whose sizes and checksum match.
if [ "$(id -u)" -eq 0 ]; then
    for b in "$tmp/cache"/*.bin; do
        python3 - "$b" <<'EOF'
import struct, sys
p = sys.argv[1]
d = open(p, 'rb').read()
magic, key_size, _, size, _ = struct.unpack('<8sIIQQ', d[:32])
key = d[32:32 + key_size]
binary = bytes((i * 131 + 7) & 0xFF for i in range(size))
h = 0xcbf29ce484222325
for c in binary:
    h = ((h ^ c) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
open(p, 'wb').write(struct.pack('<8sIIQQ', magic, key_size, 0, size, h) +
                    key + binary)
EOF
        chown 65534 "$b"
    done
    run_scenario layer ATMOE_CACHE_DIR="$tmp/cache"
    check_run "a cache of forged entries of another user"
    [ "$rc" -eq 0 ] || fail "a cache of forged entries of another user: exit $rc"
else
    echo "SKIP (not root): forged entries of another user"
fi

# --- 5. a full file system
if [ "$(id -u)" -eq 0 ] && mkdir "$tmp/full" &&
    mount -t tmpfs -o size=64k tmpfs "$tmp/full" 2> /dev/null; then
    cat /dev/zero > "$tmp/full/filler" 2> /dev/null
    to_run run "$m/manifest.json" --input "$m/x.safetensors" \
        --output "$tmp/full/y.safetensors"
    expect 1 "No space left" "atmoe run onto a full file system"
    [ -e "$tmp/full/y.safetensors" ] && fail "a failed run left its output"
    ls "$tmp/full" | grep -q -v '^filler$' &&
        fail "a failed run left a file on the full file system: $(ls "$tmp/full")"
    mkdir -m 0700 "$tmp/full/cache" 2> /dev/null
    run_scenario context ATMOE_CACHE_DIR="$tmp/full/cache"
    check_run "a cache on a full file system"
    [ "$rc" -eq 0 ] || fail "a cache on a full file system: exit $rc"
    umount "$tmp/full"
else
    echo "SKIP (not root, or no tmpfs mount here): a full file system"
fi

# --- atmoe run writes its output and trace both or neither: a destination
# that cannot take the rename (a directory) is found before either moves.
printf 'the old trace\n' > "$tmp/old-trace"
cp "$tmp/old-trace" "$tmp/trace.safetensors"
mkdir "$tmp/out-dir"
to_run run "$m/manifest.json" --input "$m/x.safetensors" --output "$tmp/out-dir" \
    --trace "$tmp/trace.safetensors"
expect 1 "is a directory" "atmoe run with a directory as --output"
cmp -s "$tmp/trace.safetensors" "$tmp/old-trace" ||
    fail "atmoe run replaced the trace although the output could not be written"
to_run run "$m/manifest.json" --input "$m/x.safetensors" \
    --output "$tmp/y1.safetensors" --trace "$tmp/out-dir"
expect 1 "is a directory" "atmoe run with a directory as --trace"
[ -e "$tmp/y1.safetensors" ] && fail "atmoe run wrote the output although the trace could not be"
ls "$tmp" | grep -q '\.tmp-' && fail "a failed atmoe run left a temporary file"

# --- 6. kill -9 mid-write: the old file or the whole new one
to_run run "$m/manifest.json" --input "$m/x.safetensors" --output "$tmp/new.safetensors"
[ "$rc" -eq 0 ] || fail "atmoe run exited $rc"
printf 'the old output\n' > "$tmp/old"
for delay in 0.02 0.05 0.1 0.15 0.2 0.3; do
    cp "$tmp/old" "$tmp/y.safetensors"
    "$atmoe" run "$m/manifest.json" --input "$m/x.safetensors" \
        --output "$tmp/y.safetensors" > /dev/null 2>&1 &
    pid=$!
    sleep "$delay"
    kill -9 "$pid" 2> /dev/null
    wait "$pid" 2> /dev/null
    cmp -s "$tmp/y.safetensors" "$tmp/old" ||
        cmp -s "$tmp/y.safetensors" "$tmp/new.safetensors" ||
        fail "atmoe run killed after ${delay}s left a mixed output"
done
for delay in 0.01 0.03 0.05 0.08; do
    "$scenario" tune "$tmp/tune" > /dev/null 2>&1 &
    pid=$!
    sleep "$delay"
    kill -9 "$pid" 2> /dev/null
    wait "$pid" 2> /dev/null
    if [ -e "$tmp/tune/tuning.json" ]; then
        "$tune" --check "$tmp/tune/tuning.json" > /dev/null 2>&1 ||
            fail "a tuning save killed after ${delay}s left a broken database"
    fi
done
# What a writer killed mid-save leaves, a minute old: the next save
# removes it, and leaves a live writer's alone.
sleep 30 &
live=$!
(exit 0) &
dead=$!
wait "$dead"
printf 'partial' > "$tmp/tune/tuning.json.atmoe-$dead-Ab12Cd"
printf 'partial' > "$tmp/tune/tuning.json.atmoe-$live-Ef34Gh"
touch -d '2 minutes ago' "$tmp/tune/tuning.json.atmoe-$dead-Ab12Cd" \
    "$tmp/tune/tuning.json.atmoe-$live-Ef34Gh"
"$scenario" tune "$tmp/tune" > "$tmp/out" 2> "$tmp/err" ||
    fail "a tuning save after a killed one failed: $(cat "$tmp/err")"
[ -e "$tmp/tune/tuning.json.atmoe-$dead-Ab12Cd" ] &&
    fail "the killed writer's temporary was not removed"
[ -e "$tmp/tune/tuning.json.atmoe-$live-Ef34Gh" ] ||
    fail "a live writer's temporary was removed"
kill "$live" 2> /dev/null
"$tune" --check "$tmp/tune/tuning.json" > /dev/null 2>&1 ||
    fail "the database after the saves is not valid"

finish "fault injection"

#!/bin/sh
# atmoe-bench at the small scale with few repetitions: its outputs (the JSON
# holds every field of the contract, the CSV a row per run) and its errors
# (unknown workload, unknown device, unwritable output file).  Exit 77 (a
# skip for automake's harness) when there is no OpenCL device.
set -u

bench=./bench/atmoe-bench
srcdir=${srcdir:-.}
ATMOE_BENCH_DATADIR="$srcdir/bench"
export ATMOE_BENCH_DATADIR

tmp=$(mktemp -d "${ATMOE_TEST_TMPDIR:-${TMPDIR:-/tmp}}/tmp-bench.XXXXXX") ||
    exit 99
trap 'rm -rf "$tmp"' EXIT INT TERM

failures=0
fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

# Runs the tool with stdout and stderr in $tmp/out and $tmp/err; sets rc.
run() {
    "$bench" "$@" > "$tmp/out" 2> "$tmp/err"
    rc=$?
}

if ! "$bench" --list-devices > /dev/null 2>&1; then
    echo "SKIP: no OpenCL device"
    exit 77
fi

# --- a run, its JSON and its CSV
run --scale small --reps 2 --warmup 1 --workload decode \
    --json "$tmp/out.json" --csv "$tmp/out.csv"
if [ "$rc" -ne 0 ]; then
    fail "decode run exited $rc"
    cat "$tmp/err"
fi
cat "$tmp/out"
for v in fused unfused merged; do
    grep -q "^decode  *small  *1 $v " "$tmp/out" ||
        fail "the table has no decode T=1 $v row"
done

"$bench" --check-json "$tmp/out.json" || fail "--check-json rejected the JSON"
for f in '"device"' '"name"' '"vendor"' '"type"' '"ceilings"' \
    '"read_gbs"' '"gflops"' '"launch_us"' '"results"' '"workload"' \
    '"scale"' '"variant"' '"params"' '"T"' '"d_in"' '"d_out"' \
    '"experts"' '"rank"' '"median_ms"' '"min_ms"' '"max_ms"' '"gbs"' \
    '"roofline"'; do
    grep -q "$f:" "$tmp/out.json" || fail "the JSON has no field $f"
done
# decode runs T = 1, 4 and 16, each in three variants
n=$(grep -c '"workload": "decode"' "$tmp/out.json")
[ "$n" -eq 9 ] || fail "the JSON holds $n decode results, not 9"
if command -v python3 > /dev/null 2>&1; then
    python3 -c 'import json, sys; json.load(open(sys.argv[1]))' \
        "$tmp/out.json" || fail "python3 cannot parse the JSON"
fi

head -n 1 "$tmp/out.csv" | grep -q '^device,vendor,type,workload,scale,variant,params,T,d_in,d_out,experts,rank,' ||
    fail "the CSV header is wrong"
n=$(grep -c ',decode,small,' "$tmp/out.csv")
[ "$n" -eq 9 ] || fail "the CSV holds $n decode rows, not 9"
ls "$tmp" | grep -q '\.tmp-' && fail "a temporary output file was left behind"

# --check-json refuses a file without the contract
echo '{"device": {}}' > "$tmp/bad.json"
run --check-json "$tmp/bad.json"
[ "$rc" -ne 0 ] || fail "--check-json accepted a file without the contract"

# --- errors
run --workload no-such-workload
[ "$rc" -eq 2 ] || fail "an unknown workload exited $rc, not 2"
grep -q "unknown workload 'no-such-workload'" "$tmp/err" ||
    fail "no message for an unknown workload"

run --device no-such-device-xyz --workload decode
[ "$rc" -eq 1 ] || [ "$rc" -eq 2 ] ||
    fail "an unknown device exited $rc, not 1 or 2"
grep -q "no-such-device-xyz" "$tmp/err" ||
    fail "no message naming the unknown device"

run --workload decode --json "$tmp/missing/out.json"
[ "$rc" -ne 0 ] || fail "an unwritable --json path exited 0"
grep -q "missing/out.json" "$tmp/err" ||
    fail "no message naming the unwritable --json path"

run --workload decode --csv "$tmp"
[ "$rc" -ne 0 ] || fail "a directory as --csv exited 0"
grep -q "is a directory" "$tmp/err" ||
    fail "no message for a directory as --csv"

run --reps 0
[ "$rc" -eq 2 ] || fail "--reps 0 exited $rc, not 2"

if [ "$failures" -ne 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "atmoe-bench: all checks passed"
exit 0

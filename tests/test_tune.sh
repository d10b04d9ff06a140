#!/bin/sh
# atmoe-tune: a short run at the small size into a fresh database, which
# must then parse and hold one entry for the device; a second run keeps
# the file valid; --check refuses a malformed file; usage errors.  The
# seed is fixed so that repeated runs find the candidates compiled in
# PoCL's kernel cache.  Exit 77 (a skip for automake's harness) when there
# is no OpenCL device.
set -u

tool=./bench/atmoe-tune
atmoe=./tools/atmoe

# shellcheck source=tests/testlib.sh
. "$(dirname "$0")/testlib.sh"
begin tune
skip_without_device "$atmoe" devices

db="$tmp/db/tuning.json"

# --- a short run writes an entry that the library accepts
run --sizes small --budget-s 5 --runs 1 --no-direct --seed 3 --clock cpu \
    --output "$db"
cat "$tmp/out"
if [ "$rc" -ne 0 ]; then
    fail "the tuner exited $rc"
    cat "$tmp/err"
fi
"$tool" --check "$db" > "$tmp/check" 2>&1 || fail "--check refused the tuner's output"
grep -q "with 1 entry" "$tmp/check" || fail "the database does not hold one entry"
grep -q '"atmoe_tuning": 1' "$db" || fail "no format version in the database"
grep -q '"info"' "$db" || fail "no info in the entry"
if command -v python3 > /dev/null 2>&1; then
    python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$db" ||
        fail "python3 cannot parse the database"
fi
ls "$tmp/db" | grep -q '\.json\.' && fail "a temporary file was left behind"

# the entry is the one a context on the device then uses
ATMOE_TUNING_FILE="$db" "$atmoe" params > "$tmp/params" 2>&1 ||
    fail "atmoe params failed"
if grep -q '"Xgemm"' "$db"; then
    grep -q '"device+driver"' "$tmp/params" ||
        fail "a context does not use the saved entry"
fi

# --- --dry-run leaves the file alone
cp "$db" "$tmp/before"
run --sizes small --budget-s 0 --runs 1 --no-direct --seed 3 --clock cpu \
    --output "$db" --dry-run
[ "$rc" -eq 0 ] || fail "a dry run exited $rc"
cmp -s "$db" "$tmp/before" || fail "a dry run changed the database"

# --- --check refuses a malformed file and says why
printf '{"atmoe_tuning": 1, "entries": [{"vendor": "PoCL"}]}\n' > "$tmp/bad.json"
run --check "$tmp/bad.json"
expect 1 "vendor and a type" "--check of a malformed file" err
run --check "$tmp/missing.json"
[ "$rc" -eq 1 ] || fail "--check of a missing file exited $rc, not 1"

# --- a malformed output database is not overwritten
run --sizes small --budget-s 0 --runs 1 --no-direct --seed 3 --clock cpu \
    --output "$tmp/bad.json"
[ "$rc" -eq 1 ] || fail "saving into a malformed database exited $rc, not 1"
grep -q '"vendor": "PoCL"}]}' "$tmp/bad.json" ||
    fail "the malformed database was changed"

# --- usage errors
run --sizes huge
[ "$rc" -eq 2 ] || fail "--sizes huge exited $rc, not 2"
run --runs 0
[ "$rc" -eq 2 ] || fail "--runs 0 exited $rc, not 2"
run --clock sundial
[ "$rc" -eq 2 ] || fail "--clock sundial exited $rc, not 2"
run --no-such-option
[ "$rc" -eq 2 ] || fail "an unknown option exited $rc, not 2"

# --- the linear phases alone (cl/linear.cl's blocks and its boundary with
# CLBlast) write integer SR and ST for the "linear" program, which a
# context on the device then uses
ldb="$tmp/linear/tuning.json"
run --phases linear --sizes small --budget-s 2 --runs 1 --seed 3 --clock cpu \
    --output "$ldb"
cat "$tmp/out"
if [ "$rc" -ne 0 ]; then
    fail "the linear phases exited $rc"
    cat "$tmp/err"
fi
"$tool" --check "$ldb" > /dev/null 2>&1 ||
    fail "--check refused the linear phases' output"
tr -d ' \n' < "$ldb" > "$tmp/flat"
grep -Eq '"kernels":\{"linear":\{[^}]*"SR":[0-9]+[,}]' "$tmp/flat" ||
    fail "no integer SR in the entry's kernels.linear"
grep -Eq '"kernels":\{"linear":\{[^}]*"ST":[0-9]+[,}]' "$tmp/flat" ||
    fail "no integer ST in the entry's kernels.linear"
grep -q '"Xgemm"' "$ldb" && fail "the linear phases wrote CLBlast sets"
ATMOE_TUNING_FILE="$ldb" "$atmoe" params > "$tmp/params" 2>&1 ||
    fail "atmoe params failed on the linear phases' output"
grep -q '"linear"' "$tmp/params" ||
    fail "a context does not use the saved linear macros"
run --phases sgemm
[ "$rc" -eq 2 ] || fail "--phases sgemm exited $rc, not 2"

# --- the blocks for bf16 weights go to "linear.bf16", beside the untyped
# "linear" the run before wrote, which stays as it was
tr -d ' \n' < "$ldb" | grep -o '"linear":{[^}]*}' > "$tmp/untyped"
[ -s "$tmp/untyped" ] || fail "no untyped linear program to keep"
run --dtype bf16 --sizes small --budget-s 2 --runs 1 --seed 3 --clock cpu \
    --output "$ldb"
cat "$tmp/out"
if [ "$rc" -ne 0 ]; then
    fail "the bf16 blocks exited $rc"
    cat "$tmp/err"
fi
"$tool" --check "$ldb" > /dev/null 2>&1 ||
    fail "--check refused the bf16 blocks' output"
tr -d ' \n' < "$ldb" > "$tmp/flat"
grep -Eq '"linear.bf16":\{"SR":[0-9]+,"ST":[0-9]+\}' "$tmp/flat" ||
    fail "no integer SR and ST in the entry's kernels.linear.bf16"
grep -o '"linear":{[^}]*}' "$tmp/flat" | cmp -s - "$tmp/untyped" ||
    fail "the bf16 blocks changed the untyped linear program"
grep -q "weights in bf16 (linear.bf16)" "$tmp/out" ||
    fail "the tuner does not say which weights it tunes for"
run --dtype bf16 --phases clblast
[ "$rc" -eq 2 ] || fail "--dtype bf16 --phases clblast exited $rc, not 2"
run --dtype q8
[ "$rc" -eq 2 ] || fail "--dtype q8 exited $rc, not 2"

finish atmoe-tune

# Helpers of the shell tests, sourced by each after it sets tool (the
# program that run runs).  The exit statuses are those of automake's
# harness: 0 pass, 1 fail, 77 skip, 99 hard error.
# shellcheck shell=sh

# begin TAG: a fresh $tmp under ATMOE_TEST_TMPDIR (or TMPDIR, or /tmp),
# removed when the test exits.
begin() {
    tmp=$(mktemp -d "${ATMOE_TEST_TMPDIR:-${TMPDIR:-/tmp}}/tmp-$1.XXXXXX") ||
        exit 99
    trap 'rm -rf "$tmp"' EXIT INT TERM
    failures=0
}

fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

# Runs the tool with stdout and stderr in $tmp/out and $tmp/err; sets rc.
# shellcheck disable=SC2154 # tool is set by the test that sources this file
run() {
    "$tool" "$@" > "$tmp/out" 2> "$tmp/err"
    rc=$?
}

# expect STATUS TEXT WHAT [out|err]: the last run exited STATUS and said
# TEXT, on the stream named or else on either.
expect() {
    if [ "$rc" -ne "$1" ]; then
        fail "$3 exited $rc, not $1"
        cat "$tmp/out" "$tmp/err"
    elif ! grep -q -F -e "$2" "$tmp/${4:-out}" "$tmp/${4:-err}"; then
        fail "$3 did not say '$2'"
        cat "$tmp/out" "$tmp/err"
    fi
}

# skip_without_device COMMAND...: exits 77 unless COMMAND, which lists the
# OpenCL devices, succeeds.
skip_without_device() {
    if ! "$@" > /dev/null 2>&1; then
        echo "SKIP: no OpenCL device"
        exit 77
    fi
}

# finish WHAT: exits 1 when a check failed, else 0.
finish() {
    if [ "$failures" -ne 0 ]; then
        echo "$failures check(s) failed"
        exit 1
    fi
    echo "$1: all checks passed"
    exit 0
}

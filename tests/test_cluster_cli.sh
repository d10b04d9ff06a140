#!/bin/sh
# atmoe cluster: k-means of a safetensors file's embeddings into a
# centroids file, and --assign of embeddings to centroids; checked on
# well-separated clusters (the true clusters found, the centroids their
# means, the scores the dot products, the same bytes for the same seed),
# and its errors: bad options, more clusters than points, an empty or
# missing tensor, NaN and zero-norm embeddings, Ctrl-C.  No failed run may
# leave an output or a temporary file behind.  Then atmoe-kmeans-bench at
# its small scale, with scikit-learn when it is installed.  Inputs are
# written and outputs read by python3's standard library (skipped without
# it); exit 77 (a skip) when there is no OpenCL device.
set -u

tool=./tools/atmoe

# shellcheck source=tests/testlib.sh
. "$(dirname "$0")/testlib.sh"
begin cluster
skip_without_device "$tool" devices
if ! command -v python3 > /dev/null 2>&1; then
    echo "SKIP: no python3 to write the inputs"
    exit 77
fi

# embeddings N D K OUT [nan ROW | zero ROW]: embeddings [N, D] around K centres
# 20 apart (label i mod K), an empty tensor "none" [0, D], and the labels.
embeddings() {
    python3 - "$@" <<'PY'
import json, random, struct, sys
n, d, k, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(7)
centre = [[rng.uniform(-10, 10) * (1 + 2 * c) for _ in range(d)] for c in range(k)]
x = [[centre[i % k][j] + rng.uniform(-0.1, 0.1) for j in range(d)] for i in range(n)]
if len(sys.argv) > 6:
    row = int(sys.argv[6])
    x[row] = [float("nan")] * d if sys.argv[5] == "nan" else [0.0] * d
data = struct.pack("<%df" % (n * d), *[v for r in x for v in r])
labels = struct.pack("<%di" % n, *[i % k for i in range(n)])
head = {"embeddings": {"dtype": "F32", "shape": [n, d], "data_offsets": [0, len(data)]},
        "labels": {"dtype": "I32", "shape": [n], "data_offsets": [len(data), len(data) + len(labels)]},
        "none": {"dtype": "F32", "shape": [0, d], "data_offsets": [len(data) + len(labels)] * 2}}
h = json.dumps(head).encode()
h += b" " * (-len(h) % 8)
with open(out, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + data + labels)
PY
}

# A reader of the outputs, to check them.
cat > "$tmp/check.py" <<'PY'
import json, math, struct, sys

def load(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    meta = head.pop("__metadata__", {})
    out = {}
    for name, t in head.items():
        s, e = t["data_offsets"]
        raw = b[8 + n + s:8 + n + e]
        fmt = {"F32": "f", "I32": "i"}[t["dtype"]]
        out[name] = (t["dtype"], t["shape"], struct.unpack("<%d%s" % (len(raw) // 4, fmt), raw))
    return out, meta

what = sys.argv[1]
if what == "centroids":
    c, meta = load(sys.argv[2])
    x, _ = load(sys.argv[3])
    k = int(sys.argv[4])
    dt, shape, cv = c["centroids"]
    _, (n, d), xv = x["embeddings"]
    labels = x["labels"][2]
    assert dt == "F32" and shape == [k, d], (dt, shape)
    # Each centroid is the mean of one true cluster.
    obj = 0.0
    for q in range(k):
        pts = [i for i in range(n) if labels[i] == q]
        mean = [sum(xv[i * d + j] for i in pts) / len(pts) for j in range(d)]
        best = min(range(k), key=lambda r: sum((cv[r * d + j] - mean[j]) ** 2 for j in range(d)))
        err = max(abs(cv[best * d + j] - mean[j]) for j in range(d))
        assert err < 1e-4, ("centroid", q, err)
        obj += sum((xv[i * d + j] - mean[j]) ** 2 for i in pts for j in range(d))
    o = float(meta["objective"])
    assert abs(o - obj) <= 1e-4 * obj, ("objective", o, obj)
elif what == "assign":
    a, _ = load(sys.argv[2])
    c, _ = load(sys.argv[3])
    x, _ = load(sys.argv[4])
    _, (k, d), cv = c["centroids"]
    _, (n, _), xv = x["embeddings"]
    labels = x["labels"][2]
    dt, shape, av = a["assignments"]
    assert dt == "I32" and shape == [n], (dt, shape)
    dt, shape, sv = a["scores"]
    assert dt == "F32" and shape == [n, k], (dt, shape)
    seen = {}
    for i in range(n):
        assert seen.setdefault(labels[i], av[i]) == av[i], ("cluster of", i)
        for q in range(k):
            want = sum(xv[i * d + j] * cv[q * d + j] for j in range(d))
            assert abs(sv[i * k + q] - want) <= 1e-5 * max(1.0, abs(want)), ("score", i, q)
    assert len(set(seen.values())) == k
PY

embeddings 203 9 3 "$tmp/in.safetensors"

# --- clustering
run cluster "$tmp/in.safetensors" --k 3 --seed 4 --restarts 2 \
    --output "$tmp/c.safetensors"
expect 0 "203 points, 3 clusters: objective" "cluster"
python3 "$tmp/check.py" centroids "$tmp/c.safetensors" "$tmp/in.safetensors" 3 ||
    fail "the centroids are not the means of the true clusters"
run inspect "$tmp/c.safetensors"
grep -q "centroids  *F32  *\[3, 9\]" "$tmp/out" ||
    fail "inspect does not show centroids F32 [3, 9]"
run cluster "$tmp/in.safetensors" --k=3 --seed=4 --restarts=2 \
    --output "$tmp/c2.safetensors" --progress
expect 0 "run 1 iteration 1 objective" "cluster --progress" err
cmp -s "$tmp/c.safetensors" "$tmp/c2.safetensors" ||
    fail "the same seed gave other centroids"
run cluster "$tmp/in.safetensors" --k 3 --output "$tmp/c3.safetensors"
grep -q "iteration" "$tmp/err" &&
    fail "progress lines without a terminal or --progress"
run cluster "$tmp/in.safetensors" --k 3 --normalize --iterations 5 \
    --tolerance 0.5 --output "$tmp/cn.safetensors"
expect 0 "objective" "cluster --normalize"

# --- assignment
run cluster --assign "$tmp/c.safetensors" "$tmp/in.safetensors" \
    --output "$tmp/a.safetensors"
expect 0 "203 points assigned to 3 clusters" "cluster --assign"
python3 "$tmp/check.py" assign "$tmp/a.safetensors" "$tmp/c.safetensors" \
    "$tmp/in.safetensors" || fail "wrong assignments or scores"

# --- errors, none of which may leave a file behind
nofile() {
    if [ -e "$tmp/bad.safetensors" ] || ls "$tmp" | grep -q tmp; then
        fail "$1 left a file behind"
        rm -f "$tmp/bad.safetensors"
    fi
}
run cluster "$tmp/in.safetensors" --k 0 --output "$tmp/bad.safetensors"
expect 2 "--k '0' must be an integer from 1" "--k 0" err
nofile "--k 0"
run cluster "$tmp/in.safetensors" --k 204 --output "$tmp/bad.safetensors"
expect 1 "more clusters than the 203 points" "--k above N" err
nofile "--k above N"
run cluster "$tmp/in.safetensors" --k 3 --tensor none \
    --output "$tmp/bad.safetensors"
expect 1 "no embeddings to cluster" "an empty tensor" err
nofile "an empty tensor"
run cluster "$tmp/in.safetensors" --k 3 --tensor missing \
    --output "$tmp/bad.safetensors"
expect 1 "has no tensor 'missing'" "a missing tensor" err
nofile "a missing tensor"
run cluster "$tmp/missing.safetensors" --k 3 --output "$tmp/bad.safetensors"
expect 1 "missing.safetensors" "a missing file" err
nofile "a missing file"
embeddings 203 9 3 "$tmp/nan.safetensors" nan 5
run cluster "$tmp/nan.safetensors" --k 3 --output "$tmp/bad.safetensors"
expect 1 "row 5 of points is not finite" "a NaN embedding" err
nofile "a NaN embedding"
run cluster --assign "$tmp/c.safetensors" "$tmp/nan.safetensors" \
    --output "$tmp/bad.safetensors"
expect 1 "row 5 of points is not finite" "--assign of a NaN embedding" err
nofile "--assign of a NaN embedding"
embeddings 203 9 3 "$tmp/zero.safetensors" zero 17
run cluster "$tmp/zero.safetensors" --k 3 --output "$tmp/z.safetensors"
expect 0 "objective" "a zero embedding without --normalize"
run cluster "$tmp/zero.safetensors" --k 3 --normalize \
    --output "$tmp/bad.safetensors"
expect 1 "row 17 of points has zero norm" "a zero embedding, --normalize" err
nofile "a zero embedding, --normalize"
run cluster "$tmp/in.safetensors" --output "$tmp/bad.safetensors"
expect 2 "usage" "cluster without --k" err
run cluster --assign "$tmp/c.safetensors" "$tmp/in.safetensors" --k 3 \
    --output "$tmp/bad.safetensors"
expect 2 "--assign takes no clustering options" "--assign with --k" err
run cluster "$tmp/in.safetensors" --k 3 --seed -1 \
    --output "$tmp/bad.safetensors"
expect 2 "--seed '-1'" "a negative seed" err
run cluster "$tmp/in.safetensors" --k 3 --output "$tmp/bad.safetensors" \
    --bogus
expect 2 "unexpected argument '--bogus'" "an unknown option" err
embeddings 9 9 3 "$tmp/wide.safetensors"
run cluster --assign "$tmp/c.safetensors" "$tmp/wide.safetensors" \
    --output "$tmp/bad.safetensors"
expect 0 "9 points assigned" "--assign of other embeddings"
rm -f "$tmp/bad.safetensors"

# --- Ctrl-C: endless restarts, interrupted after the first progress line
embeddings 4001 16 8 "$tmp/big.safetensors"
"$tool" cluster "$tmp/big.safetensors" --k 8 --restarts 1000000 --progress \
    --output "$tmp/bad.safetensors" > "$tmp/out" 2> "$tmp/err" &
pid=$!
i=0
while ! grep -q iteration "$tmp/err" && [ $i -lt 600 ]; do
    sleep 0.1
    i=$((i + 1))
done
kill -INT $pid
wait $pid
rc=$?
expect 1 "interrupted; $tmp/bad.safetensors not written" "Ctrl-C" err
nofile "Ctrl-C"

# --- the bench at its small scale, and its peer when scikit-learn is there
bench=./bench/atmoe-kmeans-bench
# The bench finds its kernels and peers in the source tree (VPATH builds).
ATMOE_BENCH_DATADIR="${srcdir:-.}/bench"
export ATMOE_BENCH_DATADIR
"$bench" --scale small --iterations 3 > "$tmp/out" 2> "$tmp/err"
rc=$?
expect 0 "s per iteration" "atmoe-kmeans-bench --scale small" out
grep -q "read ceiling [0-9.]* GB/s" "$tmp/out" ||
    fail "atmoe-kmeans-bench reports no read ceiling"
"$bench" --k 0 > "$tmp/out" 2> "$tmp/err"
rc=$?
expect 2 "--k '0' must be an integer" "atmoe-kmeans-bench --k 0" err
if /usr/bin/python3 -c 'import sklearn' > /dev/null 2>&1; then
    "$bench" --scale small --iterations 3 --peer sklearn > "$tmp/out" \
        2> "$tmp/err"
    rc=$?
    expect 0 "sklearn / atmoe per iteration" "atmoe-kmeans-bench --peer" out
else
    echo "SKIP (part): no scikit-learn, --peer sklearn is not checked"
fi

finish "atmoe cluster"

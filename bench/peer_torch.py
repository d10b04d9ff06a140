"""The PyTorch peer of atmoe-bench (atmoe-bench --peer torch).

atmoe-bench runs this script with a Python that has torch (Debian's
python3-torch) and reads what it prints.  It computes each workload's
layer the way a PyTorch user would write it, on the very weights and inputs
the bench gave the library, times it, and hands back the output so that the
bench can compare it with the library's.

  python3 peer_torch.py --probe       says whether torch and numpy can be
                                      imported, without importing them
  python3 peer_torch.py --spec FILE   runs the spec the bench wrote

The spec (JSON) holds the thread count, the repetitions, and the workloads:
their kind, shapes and constants, the seed and the draws that made their
weights, and their runs, each with a token count T and an output path.

The layers, in float32 under torch.no_grad(), with torch.set_num_threads()
at the device's compute units:

  atmoe   y = F.linear(x, W0)
          a = softmax(x W_G / tau_g)        (top-k groups: the softmax of
                                             the k largest logits, the rest 0)
          d = softmax(view(x W_D, T, G, M) / tau_d, -1)
          w = view(a[:, :, None] * d, T, E)
          y += w[:, e] * c * s_e * F.linear(F.linear(x, A_e), B_e)
                                            for every expert e, in a loop
  trex    p = softmax(F.linear(x, W_r), -1)
          om = sigmoid(100 w_om); c = sigmoid(100 w_c)
          g = k_r om p + k_s (1 - om) s_b
          z = einsum('ti,tij->tj', F.linear(x, A), view(g, T, r1, r2))
          y = F.linear(x, W0, bias) + c F.linear(z, B)

A workload with "train" set (train-step) times a training step instead:
the atmoe layer with W_G, W_D and every A_e and B_e requiring gradients
(W0 frozen), y = layer(x), loss = F.mse_loss(y, target), loss.backward(),
loss.item() (the loss read, as the library's step reads it),
torch.optim.AdamW's step (its defaults: lr 1e-3, betas 0.9 and 0.999,
eps 1e-8, weight decay 0.01) and zero_grad(set_to_none=True).  Its output
is y of the first step's forward, before any update.

torch's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE) unless the
environment sets the policy, as in bench/peer_train_torch.py.

Each run is timed by time.perf_counter() around the layer, --warmup times
untimed then --reps times; the median, minimum and maximum go back on stdout
as one JSON object per line (see bench/peer.c for the protocol), and y to
the run's output path as raw float32.

The weights are drawn exactly as the bench draws them: splitmix64 from the
workload's seed, the k-th number of the stream mapped to [-1, 1) as
(z >> 11) * 2^-52 - 1 in double, rounded to float32 and multiplied by the
draw's float32 scale.  The stream is a counter, so a draw the layer does not
use (the pooled row h of the merged variant) is skipped by its length.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

PROTOCOL = 1
CHUNK = 1 << 22  # numbers drawn at a time, to bound the memory it takes


def emit(**fields):
    print(json.dumps(fields), flush=True)


def fail(message):
    emit(event="error", message=message)
    sys.exit(1)


def probe():
    emit(event="probe", python=platform.python_version(),
         torch=importlib.util.find_spec("torch") is not None,
         numpy=importlib.util.find_spec("numpy") is not None)


class Stream:
    """The bench's splitmix64 stream (bench/measure.c; bench/atmoe-bench.c,
    fill_uniform)."""

    def __init__(self, np, seed):
        self.np = np
        self.seed = np.uint64(seed)
        self.count = 0

    def skip(self, n):
        self.count += n

    def uniform(self, n, scale):
        np = self.np
        out = np.empty(n, dtype=np.float32)
        golden = np.uint64(0x9E3779B97F4A7C15)
        m1 = np.uint64(0xBF58476D1CE4E5B9)
        m2 = np.uint64(0x94D049BB133111EB)
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            k = np.arange(self.count + start + 1, self.count + start + m + 1,
                          dtype=np.uint64)
            z = k * golden + self.seed
            z = (z ^ (z >> np.uint64(30))) * m1
            z = (z ^ (z >> np.uint64(27))) * m2
            z ^= z >> np.uint64(31)
            u = (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -52 - 1.0
            out[start:start + m] = u.astype(np.float32) * np.float32(scale)
        self.count += n
        return out


def blas_libraries():
    """The BLAS and LAPACK libraries this process mapped, by their last two
    path components: torch's GEMMs go to the system's libblas.so.3 when it
    was built with BLAS_INFO=generic (Debian's python3-torch), and Debian
    installs that under a directory naming the implementation (blas/ for
    the reference BLAS, openblas-pthread/, blis-pthread/, ...)."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                name = os.path.basename(path)
                if ("blas" in name or "blis" in name or "mkl" in name) and \
                        path.startswith("/"):
                    short = os.path.join(os.path.basename(
                        os.path.dirname(path)), name)
                    if short not in found:
                        found.append(short)
    except OSError:
        pass
    return ", ".join(found) or "unknown"


def draw_weights(np, torch, workload, unused):
    """The workload's tensors by name, each of its recorded shape."""
    stream = Stream(np, workload["seed"])
    tensors = {}
    for d in workload["draws"]:
        rows, cols = d["shape"]
        if d["name"] in unused:
            stream.skip(rows * cols)
            continue
        values = stream.uniform(rows * cols, d["scale"])
        t = torch.from_numpy(values.reshape(rows, cols))
        # A weight the library stores in half precision (atmoe-bench
        # --dtype): the same values, rounded to nearest even as it rounds.
        rounded = {"bf16": torch.bfloat16, "f16": torch.float16}
        if d.get("round") in rounded:
            t = t.to(rounded[d["round"]]).to(t.dtype)
        tensors[d["name"]] = t
    return tensors


def atmoe_layer(torch, F, w, spec):
    """The AT-MoE layer of SPEC section 3 over the experts one by one."""
    G, M = spec["groups"], spec["per_group"]
    E = G * M
    k = spec["top_k_groups"]
    tau_g, tau_d, c = spec["tau_g"], spec["tau_d"], spec["c"]
    w0, w_g, w_d = w["w0"], w["w_g"], w["w_d"]
    experts = [(w["a%d" % e], w["b%d" % e], c * spec["scales"][e])
               for e in range(E)]

    def layer(x):
        T = x.shape[0]
        y = F.linear(x, w0)
        logits = x @ w_g / tau_g
        if 0 < k < G:
            top, idx = logits.topk(k, dim=-1)
            a = torch.zeros_like(logits).scatter_(-1, idx,
                                                  torch.softmax(top, -1))
        else:
            a = torch.softmax(logits, -1)
        d = torch.softmax((x @ w_d).view(T, G, M) / tau_d, -1)
        gates = (a.unsqueeze(-1) * d).reshape(T, E)
        for e, (a_e, b_e, scale) in enumerate(experts):
            y = y + gates[:, e:e + 1] * scale * F.linear(F.linear(x, a_e), b_e)
        return y

    return layer


def trex_layer(torch, F, w, spec):
    """The T-REX (MoR1E v2) layer of SPEC section 4, one sequence."""
    r1, r2 = spec["r1"], spec["r2"]
    k_r, k_s = spec["k_r"], spec["k_s"]
    w0, bias, w_r = w["w0"], w["bias"].view(-1), w["w_r"]
    a, b, s_b = w["a"], w["b"], w["s_b"].view(-1)
    w_om = torch.tensor([spec["w_om"]], dtype=torch.float32)
    w_c = torch.tensor([spec["w_c"]], dtype=torch.float32)

    def layer(x):
        T = x.shape[0]
        p = torch.softmax(F.linear(x, w_r), -1)
        om = torch.sigmoid(100 * w_om)
        g = k_r * om * p + k_s * (1 - om) * s_b
        z = torch.einsum("ti,tij->tj", F.linear(x, a), g.view(T, r1, r2))
        c = torch.sigmoid(100 * w_c)
        return F.linear(x, w0, bias) + c * F.linear(z, b)

    return layer


def train_step(torch, F, w, spec, layer, target):
    """A training step of the layer over x, and the first forward's y."""
    E = spec["groups"] * spec["per_group"]
    params = [w["w_g"], w["w_d"]]
    params += [w["a%d" % e] for e in range(E)]
    params += [w["b%d" % e] for e in range(E)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params)

    def step(x):
        y = layer(x)
        loss = F.mse_loss(y, target[:x.shape[0]])
        loss.backward()
        loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return y.detach()

    return step


def time_layer(layer, x, reps, warmup, keep_first=False):
    """keep_first: returns y of a first, untimed call instead of the last
    (a training step's, whose weights move)."""
    first = layer(x) if keep_first else None
    for _ in range(warmup):
        layer(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        y = layer(x)
        times.append(time.perf_counter() - t0)
    return (first if keep_first else y), times


def run(spec_path):
    # Before torch starts its OpenMP threads: spinning waits made a step
    # 10 to 40 times slower on a machine shared with PoCL's threads (see
    # bench/peer_train_torch.py); OMP_WAIT_POLICY=ACTIVE restores them.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import numpy as np
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        fail("%s cannot import %s (install python3-torch)" %
             (sys.executable, e.name or e))
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("protocol") != PROTOCOL:
        fail("the spec speaks protocol %r, this script %d" %
             (spec.get("protocol"), PROTOCOL))
    threads = int(spec["threads"])
    torch.set_num_threads(max(threads, 1))
    F.linear(torch.ones(2, 2), torch.ones(2, 2))  # loads the BLAS if lazy
    emit(event="start", python=platform.python_version(),
         torch=torch.__version__, threads=torch.get_num_threads(),
         blas=blas_libraries(), omp_wait_policy=os.environ["OMP_WAIT_POLICY"])
    reps, warmup = int(spec["reps"]), int(spec["warmup"])
    builders = {"atmoe": atmoe_layer, "trex": trex_layer}
    for workload in spec["workloads"]:
        runs = workload.get("runs", [])
        if not runs:
            continue
        build = builders.get(workload["kind"])
        if build is None:
            fail("unknown workload kind %r" % workload["kind"])
        train = bool(workload.get("train"))
        with torch.set_grad_enabled(train):
            w = draw_weights(np, torch, workload, unused={"h"})
            layer = build(torch, F, w, workload)
            if train:
                layer = train_step(torch, F, w, workload, layer, w["target"])
            for r in runs:
                T = int(r["T"])
                emit(event="run", workload=workload["name"], T=T)
                x = w["x"][:T].contiguous()
                y, times = time_layer(layer, x, reps, warmup,
                                      keep_first=train)
                y.contiguous().numpy().astype(np.float32).tofile(r["output"])
                emit(event="result", workload=workload["name"], T=T,
                     median_ms=1e3 * statistics.median(times),
                     min_ms=1e3 * min(times), max_ms=1e3 * max(times))
            del w, layer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--probe", action="store_true",
                       help="say whether torch and numpy can be imported")
    group.add_argument("--spec", help="run the workloads of this spec")
    args = parser.parse_args()
    if args.probe:
        probe()
    else:
        try:
            run(args.spec)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            fail("%s: %s" % (type(e).__name__, e))


if __name__ == "__main__":
    main()

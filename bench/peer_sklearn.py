#!/usr/bin/python3
"""The scikit-learn peer of atmoe-kmeans-bench: Lloyd's k-means on the same
points from the same initial centroids.

usage: peer_sklearn.py POINTS N D K ITERATIONS

POINTS holds N x D little-endian float32 values, row-major; the initial
centroids are its first K rows, as the bench starts atmoe_kmeans.  Prints
one JSON object: the seconds of fit(), the iterations it ran, their mean,
the objective (inertia) and the threads in use.  Threads follow
OMP_NUM_THREADS, which the bench sets to the device's compute units unless
the caller set it.
"""
import json
import os
import sys
import time


def main():
    if len(sys.argv) != 6:
        sys.stderr.write(__doc__)
        return 2
    import numpy as np
    from sklearn.cluster import KMeans
    path = sys.argv[1]
    n, d, k, iterations = (int(v) for v in sys.argv[2:])
    x = np.fromfile(path, dtype="<f4", count=n * d).reshape(n, d)
    init = x[:k].copy()
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=iterations,
                tol=0.0, algorithm="lloyd")
    # A first fit of one iteration loads the threading runtime and the
    # compiled kernels, as the bench's warm-up run does for atmoe.
    KMeans(n_clusters=k, init=init, n_init=1, max_iter=1, tol=0.0,
           algorithm="lloyd").fit(x)
    t0 = time.perf_counter()
    km.fit(x)
    seconds = time.perf_counter() - t0
    try:
        from threadpoolctl import threadpool_info
        threads = max((p.get("num_threads", 0) for p in threadpool_info()),
                      default=0)
    except ImportError:
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    print(json.dumps({
        "sklearn": __import__("sklearn").__version__,
        "seconds": seconds,
        "iterations": int(km.n_iter_),
        "seconds_per_iteration": seconds / max(1, int(km.n_iter_)),
        "objective": float(km.inertia_),
        "threads": threads,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

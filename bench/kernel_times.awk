# Each kernel's launches and median device time (from running to complete)
# in a PoCL text trace, the file that POCL_TRACING=text writes: an
# independent look at a kernel's own time, which atmoe_graph_get_profile
# cannot give when a node runs several launches (the mixture's shrink,
# mix and expand).  Only launches skip+1 to skip+first of each kernel
# count (first=0: all of them), so that a bench run's warm-up and its
# later variants can be left out:
#   POCL_TRACING=text POCL_TRACING_OPT=trace.log atmoe-bench ...
#   awk -v skip=1 -v first=5 -f kernel_times.awk trace.log
BEGIN { FS = " [|] " }
$5 == "ndrange_kernel" {
    if ($6 == "running")
        start[$2] = $1
    else if ($6 == "complete" && ($2 in start)) {
        name = $8
        sub(/^name=/, "", name)
        k = ++seen[name]
        if (k > skip && (first == 0 || k <= skip + first))
            t[name, ++cnt[name]] = ($1 - start[$2]) / 1e3
        delete start[$2]
    }
}
END {
    printf "%-28s %8s %14s\n", "kernel", "launches", "median us"
    for (name in cnt) {
        m = cnt[name]
        for (i = 1; i <= m; i++)
            v[i] = t[name, i]
        for (i = 2; i <= m; i++) {
            x = v[i]
            for (j = i - 1; j > 0 && v[j] > x; j--)
                v[j + 1] = v[j]
            v[j + 1] = x
        }
        med = m % 2 ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
        printf "%-28s %8d %14.1f\n", name, m, med
    }
}

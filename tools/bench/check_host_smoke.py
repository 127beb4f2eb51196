#!/usr/bin/env python3
"""ctest bench_host_smoke: runs moecomm-bench --host-smoke under moecomm-run -n 2 and checks
that the -J file holds valid JSON lines with the expected fields and values (no time is
asserted, only that the numbers are there and consistent) and that every check passed, the
low-latency ones included. Then a low-latency run with BF16 on an odd custom shape (--host)
must pass its checks too, and so must a low-latency run with --ll-per-rank (the per-rank combine,
checked against the per-rank reference).

usage: check_host_smoke.py MOECOMM_RUN MOECOMM_BENCH JSON_PATH
"""
import json
import os
import subprocess
import sys

REQUIRED = ["date", "host", "gpu", "gpu_count", "nranks", "rank", "library_version", "commit", "build", "backend",
            "workload", "tokens_per_rank", "hidden", "topk", "experts", "dtype", "seed", "sm_budget", "iters", "warmup",
            "mode", "ll_combine", "buffers", "impl", "op", "status", "message", "whole_median_us", "whole_p10_us", "whole_p90_us",
            "kernel_median_us", "kernel_p10_us", "kernel_p90_us", "kernel_method", "host_call_median_us", "bytes",
            "bytes_rule", "gbps", "roofline_gbps", "ratio_vs_nccl", "check"]
EXPECTED_OPS = {("libmoecomm", "dispatch"), ("libmoecomm", "dispatch_cached"), ("libmoecomm", "combine"),
                ("libmoecomm", "ll_dispatch"), ("libmoecomm", "ll_combine"), ("nccl", "dispatch"), ("nccl", "combine")}


def fail(message):
    print("bench_host_smoke: FAIL: " + message)
    sys.exit(1)


def main():
    run, bench, path = sys.argv[1:4]
    if os.path.exists(path):
        os.remove(path)
    env = dict(os.environ, MOECOMM_BENCH_COMMIT="smoke-test", MOECOMM_BENCH_BUILD="smoke-build", MOECOMM_BACKEND="host")
    proc = subprocess.run([run, "-n", "2", "-t", "100", bench, "--host-smoke", "-n", "5", "-W", "1", "-J", path],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=110)
    print(proc.stdout)
    if proc.returncode != 0:
        fail("moecomm-bench exited with %d" % proc.returncode)
    if "bandwidth (GB/s" not in proc.stdout:
        fail("the table does not state the bandwidth definition")
    with open(path) as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    seen = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            fail("line %d is not JSON (%s): %s" % (number, error, line))
        missing = [key for key in REQUIRED if key not in record]
        if missing:
            fail("line %d lacks %s" % (number, missing))
        if record["commit"] != "smoke-test" or record["build"] != "smoke-build" or record["backend"] != "host" or \
                record["nranks"] != 2:
            fail("line %d: wrong commit/build/backend/nranks: %s" % (number, line))
        seen.setdefault((record["impl"], record["op"]), set()).add(record["rank"])
        want_form = "per_expert" if record["mode"] == "low_latency" else None
        if record["ll_combine"] != want_form:
            fail("line %d: ll_combine is %r, expected %r: %s" % (number, record["ll_combine"], want_form, line))
        if record["impl"] == "libmoecomm":
            if record["status"] != "ok":
                fail("line %d: the host backend should run every op: %s" % (number, line))
            if not (record["whole_p10_us"] <= record["whole_median_us"] <= record["whole_p90_us"]):
                fail("line %d: percentiles out of order" % number)
            if record["bytes"] <= 0 or record["gbps"] is None or record["gbps"] <= 0:
                fail("line %d: no bytes or bandwidth" % number)
            expected_gbps = record["bytes"] / record["whole_median_us"] / 1e3
            if abs(record["gbps"] - expected_gbps) > 1e-3 + 1e-3 * expected_gbps:
                fail("line %d: gbps %s is not bytes / median" % (number, record["gbps"]))
            if record["check"] != "passed":
                fail("line %d: check did not pass: %s" % (number, line))
        elif record["status"] != "skipped":
            fail("line %d: the NCCL baseline cannot run on the host backend: %s" % (number, line))
    for key in EXPECTED_OPS:
        if seen.get(key) != {0, 1}:
            fail("%s %s not reported by both ranks (got %s)" % (key[0], key[1], seen.get(key)))
    print("bench_host_smoke: %d JSON lines OK" % len(lines))
    check_low_latency(run, bench, path, env, "bf16", ["-T", "24", "-H", "264", "-K", "3", "-E", "6", "--dtype", "bf16"],
                      "per_expert")
    # The per-rank combine: K 4 of 8 experts, so tokens select experts on both ranks and the
    # per-rank reference (not the per-expert one) must match.
    check_low_latency(run, bench, path, env, "fp8 --ll-per-rank",
                      ["-T", "24", "-H", "256", "-K", "4", "-E", "8", "--ll-per-rank", "-c", "1"], "per_rank")


def check_low_latency(run, bench, path, env, what, flags, form):
    os.remove(path)
    proc = subprocess.run([run, "-n", "2", "-t", "60", bench, "--host", "-w", "custom"] + flags +
                          ["--ll", "-n", "2", "-W", "1", "-J", path],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=70)
    print(proc.stdout)
    if proc.returncode != 0:
        fail("moecomm-bench --host --ll (%s) exited with %d" % (what, proc.returncode))
    with open(path) as handle:
        records = [json.loads(line) for line in handle.read().splitlines() if line.strip()]
    checked = {(r["op"], r["rank"]) for r in records if r["impl"] == "libmoecomm" and r["check"] == "passed"}
    want = {(op, rank) for op in ("ll_dispatch", "ll_combine") for rank in (0, 1)}
    if checked != want:
        fail("%s low-latency checks: passed %s, expected %s" % (what, sorted(checked), sorted(want)))
    forms = {r["ll_combine"] for r in records if r["mode"] == "low_latency"}
    if forms != {form}:
        fail("%s: ll_combine %s, expected %s" % (what, sorted(forms), form))
    print("bench_host_smoke: low-latency %s checks OK" % what)


if __name__ == "__main__":
    main()

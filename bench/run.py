"""Run the whole benchmark, one fresh process per configuration, and write docs/PERFORMANCE.md with a plot.

    python -m bench.run                      # full sweep (about an hour on 2 shared CPU cores)
    python -m bench.run --lengths 256 --vocabs 49152 --no-train-step   # a quick look
    python -m bench.run --no-loss-step       # only the whole training steps on the demo model
    python -m bench.run --report-only        # re-render the doc from bench/results/results.json
    python -m bench.run --methods sdpg --save-as sdpg_patch   # a modified trainer's rows, next to the committed ones
    python -m bench.run --methods grpo sdpg --no-train-step --bf16 --results bench/results/gpu/results.json \
        --doc bench/results/gpu/PERFORMANCE.md   # on a GPU in bf16 (`make gpu-check`), apart from the CPU results

Each configuration runs `bench.loss_step` (or `bench.train_step`) in a subprocess, so peak memory is that
configuration's alone, and on CPU under an address-space limit, so an out-of-memory peer fails cleanly instead of
waking the kernel's OOM killer on a shared machine. Raw results land in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import device
from bench.loss_step import METHODS
from bench.report import targets_table, write_report

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "results.json"
#: Timed updates per completion length on CPU: a 4096-token update at 151k vocabulary takes minutes on 2 cores.
CPU_ITERS = {256: 3, 1024: 3, 4096: 1}


def mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024


def run_child(module: str, args: list[str], mem_limit: int, timeout_s: float) -> dict:
    """Run `python -m module args` in a fresh process; its last stdout line is a JSON result."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    cmd = [sys.executable, "-m", module, *args]
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    # Not on CUDA: it reserves virtual address space of the order of GPU plus host memory when it starts, which an
    # address-space limit can forbid, and a GPU out-of-memory is a clean error (torch.OutOfMemoryError) anyway.
    preexec_fn = limit_memory if device().type == "cpu" else None
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=preexec_fn, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        oom = "memory" in proc.stderr.lower() or "alloc" in proc.stderr.lower()
        return {"error": ("out of memory: " if oom else "") + tail[0][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def git_commit() -> str | None:
    """Short commit of the checkout, recorded with each result: the trainer it measured."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "sdpg_trl"], cwd=REPO).returncode != 0
    return (proc.stdout.strip() + ("+local" if dirty else "")) if proc.returncode == 0 else None


def describe(result: dict) -> str:
    if "error" in result:
        return f"FAILED ({result['error']})"
    if "median_step_s" in result:
        return f"{result['median_step_s']:.2f} s/step, peak {result['peak_gib']:.2f} GiB"
    return f"{result['median_s']:.2f} s, peak +{result['peak_delta_gib']:.2f} GiB (abs {result['peak_gib']:.2f})"


def loss_step_sweep(args: argparse.Namespace, mem_limit: int) -> list[dict]:
    """Every method at every (vocabulary, length); methods of one shape run back to back so they see similar load."""
    configs = [(v, t, m) for v in args.vocabs for t in args.lengths for m in args.methods]
    results = []
    for i, (vocab, length, method) in enumerate(configs, 1):
        iters = args.iters or CPU_ITERS.get(length, 3)
        print(f"[{i}/{len(configs)}] {method:5s} vocab={vocab} T={length} batch={args.batch} ...", end=" ", flush=True)
        start = time.perf_counter()
        child_args = ["--method", method, "--vocab", str(vocab), "--length", str(length)]
        child_args += ["--batch", str(args.batch), "--iters", str(iters)] + (["--bf16"] if args.bf16 else [])
        result = run_child("bench.loss_step", child_args, mem_limit, args.timeout)
        result |= {"kind": "loss_step", "vocab": vocab, "length": length, "batch_size": args.batch}
        result["method"] = args.save_as or method
        result["commit"] = git_commit()
        print(f"{describe(result)}  [{time.perf_counter() - start:.0f} s wall]", flush=True)
        results.append(result)
    return results


def train_step_runs(args: argparse.Namespace, mem_limit: int) -> list[dict]:
    """Whole training steps (generation included) on the demo model, GRPO then SDPG."""
    results = []
    for method in ("sdpg",) if args.save_as else ("grpo", "sdpg"):
        print(f"[train step] {method} on the demo model ...", end=" ", flush=True)
        start = time.perf_counter()
        step_args = ["--method", method, "--steps", str(args.train_steps)]
        result = run_child("bench.train_step", step_args, mem_limit, args.timeout)
        result |= {"kind": "train_step", "method": args.save_as or method, "commit": git_commit()}
        print(f"{describe(result)}  [{time.perf_counter() - start:.0f} s wall]", flush=True)
        results.append(result)
    return results


def result_key(result: dict) -> tuple:
    return result["kind"], result["method"], result.get("vocab"), result.get("length")


def save_results(new: list[dict], mem_limit_gib: float, path: Path) -> None:
    """Merge `new` into the results saved at `path`, replacing runs of the same configuration, so partial re-runs
    (`--no-train-step`, one length, one method) update the report instead of erasing the rest of it."""
    saved = json.loads(path.read_text())["results"] if path.exists() else []
    merged = {result_key(r): r for r in saved} | {result_key(r): r for r in new}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": list(merged.values()), "mem_limit_gib": mem_limit_gib}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch", type=int, default=2, help="rows per update; advantages alternate +1, -1")
    parser.add_argument("--iters", type=int, default=None, help=f"timed updates per config (default {CPU_ITERS})")
    parser.add_argument("--mem-limit-gib", type=float, default=mem_total_bytes() * 0.8 / 2**30, help="CPU only")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast updates (`make gpu-check`); default fp32")
    parser.add_argument("--no-train-step", action="store_true", help="skip the whole-step runs on the demo model")
    parser.add_argument("--no-loss-step", action="store_true", help="only the whole-step runs on the demo model")
    parser.add_argument("--train-steps", type=int, default=6, help="whole steps per method; the first is warmup")
    parser.add_argument(
        "--save-as",
        choices=("sdpg_patch",),
        help="record the loss-step runs under this name (e.g. with the patch applied)",
    )
    parser.add_argument("--report-only", action="store_true", help="re-render the doc from saved results")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the raw results are kept and merged")
    args = parser.parse_args()

    if not args.report_only:
        mem_limit = int(args.mem_limit_gib * 2**30)
        results = [] if args.no_loss_step else loss_step_sweep(args, mem_limit)
        if not args.no_train_step:
            results += train_step_runs(args, mem_limit)
        save_results(results, args.mem_limit_gib, args.results)
    saved = json.loads(args.results.read_text())
    write_report(saved["results"], saved["mem_limit_gib"], args.doc)
    print("\n".join(targets_table(saved["results"], saved["mem_limit_gib"])))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()

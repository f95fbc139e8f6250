"""Render benchmark results as docs/PERFORMANCE.md tables (ratios to GRPO) and a PNG plot."""

from __future__ import annotations

import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the bench runs on servers
import matplotlib.pyplot as plt
import torch
import transformers
import trl

LABELS = {
    "grpo": "TRL GRPOTrainer",
    "sdpg": "SDPGTrainer (chunked)",
    "sdpg_patch": "SDPGTrainer, one head pass (proposed patch)",
    "naive": "naive SDPG (full logits)",
    "sdpo": "TRL SDPOTrainer full_logits",
}
TIME_TARGET = 1.45
MEMORY_TARGET = 1.10
PEER_MEMORY_FACTOR = 3.0
STEP_TARGET = 1.15


def machine() -> str:
    """CPU model, cores, GPU if any, library versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads / {__import__('os').cpu_count()} cores, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}"
    )


def label(result: dict) -> str:
    """Method name, with the commit of sdpg_trl it measured for SDPG rows (the trainer changes between runs)."""
    name = LABELS[result["method"]]
    return f"{name} @ {result['commit']}" if result["method"].startswith("sdpg") and result.get("commit") else name


def by_key(results: list[dict]) -> dict[tuple, dict]:
    return {(r["vocab"], r["length"], r["method"]): r for r in results if r.get("kind") == "loss_step"}


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def loss_step_table(results: list[dict], mem_limit_gib: float) -> list[str]:
    """One row per (vocab, length, method): absolute numbers and ratios to GRPO of the same shape."""
    table = by_key(results)
    lines = [
        "| vocab | T | method | time (s) | time / GRPO | CPU time / GRPO | peak +mem (GiB) | +mem / GRPO "
        "| peak abs (GiB) | abs / GRPO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (vocab, length, method), r in sorted(
        table.items(), key=lambda kv: (kv[0][0], kv[0][1], list(LABELS).index(kv[0][2]))
    ):
        base = table.get((vocab, length, "grpo"), {})
        if "error" in r:
            lines.append(
                f"| {vocab} | {length} | {label(r)} | failed: {r['error'][:80]} | | | "
                f"> {mem_limit_gib:.1f} limit | | | |"
            )
            continue
        lines.append(
            f"| {vocab} | {length} | {label(r)} | {r['median_s']:.2f} "
            f"| {fmt_ratio(ratio(r['median_s'], base.get('median_s')))} "
            f"| {fmt_ratio(ratio(r['median_cpu_s'], base.get('median_cpu_s')))} "
            f"| {r['peak_delta_gib']:.2f} | {fmt_ratio(ratio(r['peak_delta_gib'], base.get('peak_delta_gib')))} "
            f"| {r['peak_gib']:.2f} | {fmt_ratio(ratio(r['peak_gib'], base.get('peak_gib')))} |"
        )
    return lines


def train_step_table(results: list[dict]) -> list[str]:
    steps = {r["method"]: r for r in results if r.get("kind") == "train_step"}
    if not steps:
        return ["(not run)"]
    base = steps.get("grpo", {})
    lines = [
        "| method | median step (s) | step / GRPO | CPU time / GRPO | step times (s) | mean completion length "
        "| peak +mem (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, r in steps.items():
        if "error" in r:
            lines.append(f"| {label(r)} | failed: {r['error'][:80]} | | | | | |")
            continue
        times = ", ".join(f"{t:.1f}" for t in r["step_times_s"])
        lines.append(
            f"| {label(r)} | {r['median_step_s']:.2f} "
            f"| {fmt_ratio(ratio(r['median_step_s'], base.get('median_step_s')))} "
            f"| {fmt_ratio(ratio(r['median_step_cpu_s'], base.get('median_step_cpu_s')))} | {times} "
            f"| {r['mean_completion_len']:.1f} | {r['peak_delta_gib']:.2f} |"
        )
    return lines


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def targets_table(results: list[dict], mem_limit_gib: float) -> list[str]:
    """Issue 4's targets, each with its measured number and met / missed, from the same run."""
    table = by_key(results)
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for (vocab, length, method), r in sorted(table.items()):
        base = table.get((vocab, length, "grpo"), {})
        if method not in ("sdpg", "sdpg_patch") or "error" in r or "error" in base:
            continue
        t_wall = ratio(r["median_s"], base["median_s"])
        t_cpu = ratio(r["median_cpu_s"], base["median_cpu_s"])
        mem = ratio(r["peak_delta_gib"], base["peak_delta_gib"])
        lines.append(
            f"| {label(r)}: update time <= {TIME_TARGET}x GRPO, V={vocab}, T={length} "
            f"| wall {t_wall:.2f}x, CPU {t_cpu:.2f}x "
            f"| {verdict(max(t_wall, t_cpu) <= TIME_TARGET)} |"
        )
        lines.append(
            f"| {label(r)}: peak memory <= {MEMORY_TARGET}x GRPO, V={vocab}, T={length} | {mem:.2f}x "
            f"| {verdict(mem <= MEMORY_TARGET)} |"
        )
    vocab, length = max(k[0] for k in table), max(k[1] for k in table)
    sdpg = table.get((vocab, length, "sdpg"), {})
    for peer in ("naive", "sdpo"):
        other = table.get((vocab, length, peer))
        if other is None or "peak_delta_gib" not in sdpg:
            continue
        need = PEER_MEMORY_FACTOR if peer == "naive" else 1.0
        if "error" in other:  # the peer ran out of the address-space limit: its peak is at least the limit's headroom
            floor = mem_limit_gib - sdpg["baseline_gib"]
            measured, ok = (
                f"SDPG +{sdpg['peak_delta_gib']:.2f} GiB vs {peer} > {floor:.1f} GiB (failed at the limit)",
                (floor >= need * sdpg["peak_delta_gib"]),
            )
        else:
            measured = f"SDPG +{sdpg['peak_delta_gib']:.2f} GiB vs {peer} +{other['peak_delta_gib']:.2f} GiB"
            ok = (
                other["peak_delta_gib"] >= need * sdpg["peak_delta_gib"]
                and other["peak_delta_gib"] > sdpg["peak_delta_gib"]
            )
        target = f"at least {need:.0f}x below {LABELS[peer]}" if need > 1 else f"below {LABELS[peer]}"
        lines.append(f"| peak memory at V={vocab}, T={length} {target} | {measured} | {verdict(ok)} |")
    steps = {r["method"]: r for r in results if r.get("kind") == "train_step" and "error" not in r}
    for method in ("sdpg", "sdpg_patch"):
        if {"grpo", method} <= steps.keys():
            wall = ratio(steps[method]["median_step_s"], steps["grpo"]["median_step_s"])
            cpu = ratio(steps[method]["median_step_cpu_s"], steps["grpo"]["median_step_cpu_s"])
            lines.append(
                f"| {label(steps[method])}: whole step with generation <= {STEP_TARGET}x GRPO (demo) "
                f"| wall {wall:.2f}x, CPU {cpu:.2f}x | {verdict(max(wall, cpu) <= STEP_TARGET)} |"
            )
    return lines


def plot(results: list[dict], path: Path) -> None:
    """CPU-time and memory ratios to GRPO against completion length, one line per method and vocabulary (CPU time,
    because wall time on a shared machine mostly measures the neighbours; the table has both)."""
    table = by_key(results)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    vocabs = sorted({k[0] for k in table})
    for method in ("sdpg", "sdpg_patch", "naive", "sdpo"):
        for vocab, style in zip(vocabs, ("-o", "--s")):
            points = [
                (length, table[(vocab, length, method)], table.get((vocab, length, "grpo"), {}))
                for (v, length, m) in sorted(table)
                if v == vocab and m == method and "error" not in table[(v, length, m)]
            ]
            if not points:
                continue
            lengths = [p[0] for p in points]
            name = f"{label(points[0][1])}, V={vocab // 1000}k"
            ax_t.plot(
                lengths, [ratio(p[1]["median_cpu_s"], p[2].get("median_cpu_s")) for p in points], style, label=name
            )
            ax_m.plot(
                lengths, [ratio(p[1]["peak_delta_gib"], p[2].get("peak_delta_gib")) for p in points], style, label=name
            )
    memory_title = "peak memory / GRPO (full-logits peers: out of memory at 4096 x 151936)"
    for ax, target, title in ((ax_t, TIME_TARGET, "update CPU time / GRPO"), (ax_m, MEMORY_TARGET, memory_title)):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(target, color="red", lw=0.8, ls=":", label=f"target {target}x")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("completion tokens")
        ax.set_title(title)
    ax_m.set_yscale("log")
    ax_m.title.set_fontsize(9)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict], mem_limit_gib: float, doc: Path) -> None:
    """Write the measured section of docs/PERFORMANCE.md (between markers, keeping the hand-written analysis)."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    png = doc.with_name("performance.png")
    plot(results, png)
    batch = next((r["batch_size"] for r in results if r.get("kind") == "loss_step"), "?")
    precisions = sorted({r.get("precision", "fp32") for r in results if r.get("kind") == "loss_step"})
    measured = [
        "<!-- BEGIN MEASURED (written by `python -m bench.run`) -->",
        f"Machine: {machine()}.",
        "",
        f"### One training update (forward, backward, AdamW step; generation excluded), batch {batch}, "
        f"{' and '.join(precisions) or 'fp32'}",
        "",
        *loss_step_table(results, mem_limit_gib),
        "",
        f"![time and memory ratios to GRPO]({png.name})",
        "",
        "### Targets (issue 4; a time target counts as met only if both wall and CPU ratios meet it)",
        "",
        *targets_table(results, mem_limit_gib),
        "",
        "### One whole training step with generation, demo model (SmolLM2-135M-Instruct)",
        "",
        *train_step_table(results),
        "<!-- END MEASURED -->",
    ]
    text = doc.read_text() if doc.exists() else "# Performance\n\n<!-- BEGIN MEASURED -->\n<!-- END MEASURED -->\n"
    head, _, rest = text.partition("<!-- BEGIN MEASURED")
    _, _, tail = rest.partition("<!-- END MEASURED -->")
    doc.write_text(head + "\n".join(measured) + tail)

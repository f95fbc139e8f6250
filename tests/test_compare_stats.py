"""`sdpg-compare`'s paired comparison with the baseline: numbers checked against an independent computation, pairing,
coverage, different seed sets, and a report that renders the same twice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from sdpg_trl.compare import (
    analyse,
    compare_with_baseline,
    detectable_difference,
    holm,
    merge_runs,
    paired_comparison,
    paired_t,
    render_report,
    seeds_needed,
    write_report,
)


def runs_of(table: dict[str, dict[int, float]]) -> dict[str, dict[int, dict]]:
    """`runs` as `collect` gives them, with only the held-out Last (what the comparison reads)."""
    return {m: {s: {"last": v, "best": v, "final": {}, "curves": {}, "history": {}} for s, v in by_seed.items()}
            for m, by_seed in table.items()}  # fmt: skip


def test_a_small_table_matches_an_independent_computation():
    # Expected numbers computed once by hand formulas without scipy: Student t quantiles and CDF by quadrature
    # of the t density, power by quadrature over the chi distribution of the sample SD (E[Phi(nc - c U / sqrt(df)) +
    # Phi(-nc - c U / sqrt(df))]), the chi-square(3) 0.2-quantile from its closed-form CDF. The same quadrature gives
    # the textbook paired-t sample sizes: 34 pairs for d = 0.5 and 10 for d = 1 (80% power, two-sided 0.05).
    baseline = {0: 0.20, 1: 0.30, 2: 0.25, 3: 0.10}
    method = {0: 0.28, 1: 0.29, 2: 0.33, 3: 0.22}
    c = paired_comparison(baseline, method, min_effect=0.05, eval_samples=256)
    assert c["differences"] == pytest.approx([0.08, -0.01, 0.08, 0.12])
    assert (c["n"], c["wins"], c["losses"], c["ties"]) == (4, 3, 1, 0)
    assert c["mean"] == pytest.approx(0.0675) and c["sd"] == pytest.approx(0.055)
    assert c["ci95"] == pytest.approx([-0.0200173, 0.1550173], abs=1e-6)  # mean ± 3.182446 · sd / 2
    assert c["ci90"] == pytest.approx([0.0027825, 0.1322175], abs=1e-6)  # mean ± 2.353363 · sd / 2
    assert c["p"] == pytest.approx(0.0913093, abs=1e-6)
    assert c["correlation"] == pytest.approx(0.8157437, abs=1e-6)
    assert c["eval_variance"] == pytest.approx(0.00141931, abs=1e-8)  # mean of (b(1-b) + m(1-m)) / 255
    assert c["eval_noise_share"] == pytest.approx(0.4691946, abs=1e-6)
    assert c["detectable"] == pytest.approx(0.1170372, abs=1e-5)  # 2.127952 SD at 4 pairs
    assert c["seeds_needed"] == 12
    assert c["sd_upper"] == pytest.approx(0.0950173, abs=1e-6)  # sd · sqrt(3 / 1.005174)
    assert c["seeds_needed_pessimistic"] == 31
    assert c["sd_with_4x_eval_samples"] == pytest.approx(0.0442778, abs=1e-6)  # sqrt(sd² - 3/4 of the eval variance)
    assert (seeds_needed(0.5, 1.0), seeds_needed(1.0, 1.0)) == (34, 10)
    assert detectable_difference(1.0, 3) == pytest.approx(3.264044, abs=1e-5)
    result = compare_with_baseline(runs_of({"base": baseline, "m": method}), "base", 0.05, 256)["methods"]["m"]
    assert result["verdict"] == "UNRESOLVED" and result["underpowered"]  # p 0.09; 90% CI not inside ±0.05
    text = render_report(analyse({"runs": runs_of({"base": baseline, "m": method}), "eval_samples_per_run": 256},
                                 baseline="base"))  # fmt: skip
    assert "UNDERPOWERED: the smallest difference these seeds detect, 0.117, is above 0.05" in text
    assert "0.05 needs 12 paired seeds at the observed SD, 31 at its 80% upper confidence limit (0.095)" in text
    assert "With 4 pairs no exact test (sign or permutation) can reach p < 0.05: its smallest two-sided p is " in text


def test_holm_and_the_verdicts():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    base = {s: 0.2 + 0.05 * s for s in range(6)}
    table = {
        "base": base,
        "up": {s: v + 0.1 + 0.002 * (-1) ** s for s, v in base.items()},
        "down": {s: v - 0.1 + 0.002 * (-1) ** s for s, v in base.items()},
        "same": {s: v + 0.003 * (-1) ** s for s, v in base.items()},
        "noisy": {s: v + 0.2 * (-1) ** s for s, v in base.items()},
    }
    verdicts = {
        m: c["verdict"] for m, c in compare_with_baseline(runs_of(table), "base", 0.05, None)["methods"].items()
    }
    assert verdicts == {"up": "BETTER", "down": "WORSE", "same": "EQUIVALENT", "noisy": "UNRESOLVED"}


def test_pairing_by_seed_finds_a_difference_an_unpaired_test_misses():
    rng = np.random.default_rng(0)
    seed_effect = np.array([-0.15, -0.05, 0.0, 0.05, 0.15])  # moves both methods alike (data order, base sampling)
    base = 0.3 + seed_effect + rng.normal(0, 0.005, size=5)
    other = 0.3 + seed_effect + 0.04 + rng.normal(0, 0.005, size=5)
    table = {"grpo": dict(enumerate(base)), "x": dict(enumerate(other))}
    c = compare_with_baseline(runs_of(table), "grpo", 0.05, None)["methods"]["x"]
    assert c["verdict"] == "BETTER" and c["ci95"][0] > 0
    assert stats.ttest_ind(other, base).pvalue > 0.05  # unpaired, the seed effect hides the difference


def test_the_95_percent_interval_covers_a_null_difference_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered, tables = 0, 4000
    for _ in range(tables):
        seed_effect = rng.normal(0, 0.08, size=3)
        base = 0.25 + seed_effect + rng.normal(0, 0.03, size=3)
        other = 0.25 + seed_effect + rng.normal(0, 0.03, size=3)
        low, high = paired_t(base, other)["ci95"]  # the interval paired_comparison reports
        covered += low <= 0 <= high
    assert 0.94 <= covered / tables <= 0.96


def test_methods_with_other_seeds_compare_on_the_shared_ones_and_name_the_rest():
    table = {"grpo": {s: 0.2 + 0.01 * s for s in range(5)}, "x": {0: 0.25, 1: 0.2, 2: 0.3, 7: 0.4}}
    results = analyse({"runs": runs_of(table), "eval_samples_per_run": 256})
    c = results["comparisons"]["methods"]["x"]
    assert c["seeds"] == [0, 1, 2] and c["baseline_only"] == [3, 4] and c["method_only"] == [7]
    assert c["differences"] == pytest.approx([0.05, -0.01, 0.08])
    assert "left out, not finished by both: grpo's seed(s) 3, 4; x's seed(s) 7" in render_report(results)
    one = analyse({"runs": runs_of({"grpo": {0: 0.2}, "x": {0: 0.3}})})["comparisons"]["methods"]["x"]
    assert one["ci95"] is None and one["verdict"] == "UNRESOLVED"
    assert "one pair gives no interval" in render_report(analyse({"runs": runs_of({"grpo": {0: 0.2}, "x": {0: 0.3}})}))


def test_the_same_input_renders_the_same_report_twice(tmp_path):
    table = {"grpo": {0: 0.3, 1: 0.22, 2: 0.13}, "x": {0: 0.22, 1: 0.2, 2: 0.17}, "y": {0: 0.23, 1: 0.29}}
    reports = []
    for name in ("a", "b"):
        results = analyse(json.loads(json.dumps({"runs": runs_of(table), "eval_samples_per_run": 256})))
        write_report(results, tmp_path / name)
        reports.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()})
    assert reports[0] == reports[1] and {"results.md", "differences.png", "paired_accuracy.png"} <= set(reports[0])
    assert "| x | 3 | -0.020 |" in reports[0]["results.md"].decode()


def test_merging_runs_refuses_the_same_run_with_other_numbers():
    first = {"runs": runs_of({"grpo": {0: 0.3}}), "base_accuracy": 0.1, "eval_samples_per_run": 256}
    second = {"runs": runs_of({"grpo": {"0": 0.3, "3": 0.2}, "x": {3: 0.25}}), "base_accuracy": 0.1}
    merged = merge_runs([("a", first), ("b", json.loads(json.dumps(second)))])
    assert {m: sorted(r) for m, r in merged["runs"].items()} == {"grpo": [0, 3], "x": [3]}
    assert merged["eval_samples_per_run"] == 256 and merged["warnings"] == []
    with pytest.raises(ValueError, match="grpo seed 0 is in both a and c"):
        merge_runs([("a", first), ("c", {"runs": runs_of({"grpo": {0: 0.31}})})])
    other_base = merge_runs([("a", first), ("d", {"runs": {}, "base_accuracy": 0.2})])
    assert other_base["warnings"] == ["d: base_accuracy is 0.2, not 0.1 as in a."]
    # A re-render that merges a folder again: its warnings, already in the report's results.json, are not doubled.
    again = merge_runs([("report", other_base), ("d", {"runs": {}, "warnings": other_base["warnings"]})])
    assert again["warnings"] == ["d: base_accuracy is 0.2, not 0.1 as in a."]


def test_without_a_baseline_there_is_no_comparison_and_the_report_says_so():
    results = analyse({"runs": runs_of({"a": {0: 0.2, 1: 0.3}, "b": {0: 0.25, 1: 0.3}})})
    assert results["comparisons"] is None
    assert "No paired comparison: no baseline" in render_report(results)
    assert analyse({"runs": runs_of({"a": {0: 0.2}, "b": {0: 0.25}})}, baseline="b")["comparisons"]["baseline"] == "b"


def test_when_evaluation_noise_dominates_the_report_says_more_samples_help_more():
    table = {"grpo": {0: 0.20, 1: 0.30, 2: 0.25, 3: 0.10}, "x": {0: 0.26, 1: 0.33, 2: 0.27, 3: 0.18}}
    results = analyse({"runs": runs_of(table), "eval_samples_per_run": 64})
    c = results["comparisons"]["methods"]["x"]
    assert c["eval_noise_share"] > 1 and c["sd_without_eval_noise"] == 0  # binomial noise alone explains the spread
    text = render_report(results)
    assert (
        "more evaluation samples per run (cheap) help more than more seeds. With 4x the evaluation samples (256"
        in text
    )


@pytest.mark.parametrize(
    "table",
    [
        {"grpo": {0: 0.50, 1: 0.60}, "x": {0: 0.51, 1: 0.61}},  # equal up to float rounding (SD ~1e-17)
        {"grpo": {0: 0.5, 1: 0.625}, "x": {0: 0.75, 1: 0.875}},  # exactly equal, as k/N accuracies often are
    ],
)
def test_equal_differences_on_every_seed_give_no_verdict(table, tmp_path):
    # With no spread between seeds a t test measures no noise: 2 seeds must not make a method BETTER.
    results = analyse({"runs": runs_of(table), "eval_samples_per_run": 200})
    c = results["comparisons"]["methods"]["x"]
    assert c["no_spread"] and c["verdict"] == "UNRESOLVED"
    assert c["p"] is None and c["ci95"] is None and c["detectable"] is None and c["seeds_needed"] is None
    assert "on every seed. With no spread between seeds" in render_report(results)
    write_report(results, tmp_path)  # the table and figures draw a comparison without an interval

"""`sdpg-compare`: the aggregate numbers by hand, the seed-major plan and resume logic, and one real comparison on
the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from sdpg_trl.compare import (
    aggregate,
    collect,
    diagnostics,
    execute,
    is_finished,
    load_recipe,
    plan_runs,
    plot_curves,
    render_diagnostics,
    summarise_run,
)
from sdpg_trl.scripts.compare import main
from sdpg_trl.scripts.train import make_parser


def history(evals: dict[int, float], steps: int = 4, reward: float = 0.5) -> list[dict]:
    """A trainer log history: one training entry per step and an eval entry at the given steps."""
    log = [{"step": s, "epoch": s / 10, "reward": reward + s, "entropy": 1.0 / s, "completions/mean_length": 10.0 * s,
            "kl": 0.01 * s, "sdpg/gate_ratio": 0.25 * s} for s in range(1, steps + 1)]  # fmt: skip
    log += [{"step": s, "eval_accuracy": acc} for s, acc in evals.items()]
    return log


def test_summary_and_aggregate_by_hand():
    runs = {
        "a": {0: summarise_run(history({2: 0.2, 4: 0.3}), base_accuracy=0.1),
              1: summarise_run(history({2: 0.5, 4: 0.4}), base_accuracy=0.1)},
        "b": {0: summarise_run(history({2: 0.6, 4: 0.6}), base_accuracy=0.1)},
    }  # fmt: skip
    assert runs["a"][0]["curves"]["eval_accuracy"] == [(0, 0.1), (2, 0.2), (4, 0.3)]  # the base is step 0
    assert (runs["a"][0]["last"], runs["a"][0]["best"], runs["a"][1]["best"]) == (0.3, 0.3, 0.5)
    assert runs["a"][0]["final"]["reward"] == pytest.approx((2.5 + 3.5 + 4.5) / 3)  # mean of the last 3 steps
    logged = runs["a"][0]["history"]  # every logged series, as logged (no base step 0)
    assert logged["sdpg/gate_ratio"] == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    assert logged["eval_accuracy"] == [(2, 0.2), (4, 0.3)] and "step" not in logged and "epoch" not in logged
    table = aggregate(runs, num_eval_samples=100)
    last_mean, last_se = table["a"]["last"]
    assert last_mean == pytest.approx(0.35) and last_se == pytest.approx(0.05)  # stdev(0.3, 0.4) / sqrt(2)
    assert table["a"]["best"] == pytest.approx((0.4, 0.1))  # best 0.3 and 0.5
    assert table["a"]["sampling_se"] == pytest.approx(math.sqrt(0.35 * 0.65 / 100))
    assert table["b"]["last"][0] == 0.6 and math.isnan(table["b"]["last"][1])  # one seed: no spread
    assert table["a"]["seeds"] == [0, 1]


def test_diagnostics_by_hand():
    def run(distill: list[float | None], gap: float) -> dict:
        log = [
            {"step": s, "grad_norm/outcome": 2.0 * s, "grad_norm/distill": d, "sdpg/teacher_minus_student_logp": gap}
            for s, d in enumerate(distill, start=1)
        ]
        return summarise_run(log, base_accuracy=None)

    # Seed 0: steps 1 and 3 give ratios 1/2 and 3/6 (step 2 logged no distillation norm); seed 1: 1/2 and 1/4.
    results = {
        "runs": {"sdpg": {0: run([1.0, None, 3.0], -0.1), 1: run([1.0, 1.0], 0.3)}, "grpo": {0: run([None], 0.0)}}
    }
    table = diagnostics(results)
    assert table["sdpg"]["distill / outcome grad norm"] == pytest.approx((0.4375, 0.0625))  # means 0.5, 0.375
    assert table["sdpg"]["teacher - student logp"] == pytest.approx((0.1, 0.2))
    assert "distill / outcome grad norm" not in table["grpo"]  # never logged: no column, not 0
    text = render_diagnostics(results)
    assert "| sdpg | 0.438 ± 0.062 | 0.100 ± 0.200 |" in text and "| grpo | — | 0.000 |" in text


def test_collect_counts_evaluation_samples_as_the_base_evaluation_did(tmp_path):
    recipe = {"train": {"dataset_name": "aime24", "eval_k": 3}, "methods": {"a": {}}, "seeds": [0]}
    (run,) = plan_runs(recipe, tmp_path)
    run.folder.mkdir(parents=True)
    (run.folder / "trainer_state.json").write_text(json.dumps({"log_history": history({4: 0.4})}))
    (run.folder / "run.json").write_text("{}")
    assert collect(tmp_path, recipe)["eval_samples_per_run"] is None  # no arithmetic size, no base evaluation
    (tmp_path / "base_eval.json").write_text(json.dumps({"accuracy": 0.1, "num_problems": 30, "k": 3}))
    results = collect(tmp_path, recipe)
    assert results["eval_samples_per_run"] == 90 and results["base_accuracy"] == 0.1
    assert results["methods"]["a"]["sampling_se"] == pytest.approx(math.sqrt(0.4 * 0.6 / 90))
    assert json.loads(json.dumps(results))["runs"]["a"]["0"]["history"]["sdpg/gate_ratio"][0] == [1, 0.25]


def test_warns_when_the_last_evaluation_is_not_of_the_final_model(tmp_path):
    from sdpg_trl.compare import last_evaluation_warnings

    methods = {"a": {"max_steps": 8}, "b": {"max_steps": 10}}
    recipe = {"train": {"eval_every_steps": 4}, "methods": methods, "seeds": [0, 1]}
    assert last_evaluation_warnings(plan_runs(recipe, tmp_path)) == [
        "b: max_steps 10 is not a multiple of eval_every_steps 4, so 'Last' is the accuracy at step 8, not of the "
        "final model."
    ]


def test_recipe_shape_is_checked(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 1}, "methods": {"a": {"max_steps": 2}}, "seeds": [0]}))
    with pytest.raises(ValueError, match="'a' sets \\['max_steps'\\]"):
        load_recipe(path)
    path.write_text(yaml.safe_dump({"train": {}, "methods": {"a": {}}}))
    with pytest.raises(ValueError, match="train, methods and seeds"):
        load_recipe(path)
    recipe = {"train": {}, "methods": {"a": {}, "b": {}}, "seeds": [0], "baseline": "b", "min_effect": 0.02}
    path.write_text(yaml.safe_dump(recipe))
    assert load_recipe(path)["baseline"] == "b"
    path.write_text(yaml.safe_dump({**recipe, "baseline": "c"}))
    with pytest.raises(ValueError, match="baseline 'c' is not one of the methods \\['a', 'b'\\]"):
        load_recipe(path)
    path.write_text(yaml.safe_dump({**recipe, "min_effect": -0.1}))
    with pytest.raises(ValueError, match="min_effect must be a positive number"):
        load_recipe(path)


def test_plan_is_seed_major_and_resume_skips_finished_runs(tmp_path):
    recipe = {"train": {"max_steps": 1}, "methods": {"grpo": {"method": "grpo"}, "sdpg": {}}, "seeds": [0, 1]}
    runs = plan_runs(recipe, tmp_path)
    assert [(r.method, r.seed) for r in runs] == [("grpo", 0), ("sdpg", 0), ("grpo", 1), ("sdpg", 1)]
    assert runs[0].config == {
        "max_steps": 1, "method": "grpo", "seed": 0, "output_dir": str(tmp_path / "grpo" / "seed0"),
        "eval_before_training": False,
    }  # fmt: skip
    trained = []

    def fake_train(run):
        run.folder.mkdir(parents=True, exist_ok=True)
        (run.folder / "trainer_state.json").write_text(json.dumps({"log_history": history({1: 0.5}, steps=1)}))
        trained.append((run.method, run.seed))

    runs[1].folder.mkdir(parents=True)  # an interrupted run: a folder without the finished marker
    (runs[1].folder / "stale.txt").write_text("x")
    lines = []
    execute(runs[:2], train=fake_train, echo=lines.append)
    assert trained == [("grpo", 0), ("sdpg", 0)] and all(is_finished(r) for r in runs[:2])
    assert not (runs[1].folder / "stale.txt").exists() and any("starting it again" in line for line in lines)
    execute(runs, train=fake_train, echo=lines.append)  # the finished ones are not rerun
    assert trained == [("grpo", 0), ("sdpg", 0), ("grpo", 1), ("sdpg", 1)]
    marker = json.loads((runs[0].folder / "run.json").read_text())
    assert marker["config"] == runs[0].config and marker["wall_s"] >= 0 and "git_commit" in marker


def test_resuming_into_runs_finished_with_other_settings_is_refused(tmp_path):
    recipe = {"train": {"max_steps": 1}, "methods": {"a": {"distill_coef": 0.5}}, "seeds": [0]}
    trained = []
    execute(plan_runs(recipe, tmp_path), train=fake_trainer(set(), trained), echo=print)
    execute(plan_runs(recipe, tmp_path), train=fake_trainer(set(), trained), echo=print)  # same settings: skipped
    recipe["methods"]["a"]["distill_coef"] = 1.0  # an edited recipe, same output folder
    with pytest.raises(ValueError, match="a seed 0: distill_coef: 0.5 -> 1.0"):
        execute(plan_runs(recipe, tmp_path), train=fake_trainer(set(), trained), echo=print)
    with pytest.raises(ValueError, match="model_name_or_path: None -> 'other/model'"):
        execute(plan_runs(recipe, tmp_path, model_name_or_path="other/model"), train=fake_trainer(set(), trained))
    assert trained == [("a", 0)]


def test_a_completed_run_without_its_marker_is_adopted_not_retrained(tmp_path):
    recipe = {"train": {"max_steps": 1}, "methods": {"a": {}, "b": {}}, "seeds": [0]}
    runs = plan_runs(recipe, tmp_path)
    for run in runs:  # what sdpg-train leaves when the comparison stops before writing run.json
        run.folder.mkdir(parents=True)
        state = {"log_history": [*history({1: 0.5}, steps=1), {"step": 1, "train_runtime": 42.0}]}
        (run.folder / "trainer_state.json").write_text(json.dumps(state))
        (run.folder / "config.yaml").write_text(yaml.safe_dump({**run.config, "max_steps": 1 + (run.method == "b")}))
    with pytest.raises(ValueError, match="b seed 0: max_steps: 2 -> 1"):  # b was trained with other settings
        execute(runs, train=fake_trainer(set(), []))
    trained = []
    assert execute(runs[:1], train=fake_trainer(set(), trained)) == [] and trained == []
    marker = json.loads((runs[0].folder / "run.json").read_text())
    assert marker["adopted"] and marker["wall_s"] == 42.0 and marker["config"] == runs[0].config


def fake_trainer(fail: set[str], trained: list):
    """A stand-in for `train_in_subprocess`: methods in `fail` raise, the others leave a one-step trainer state."""

    def train(run):
        trained.append((run.method, run.seed))
        run.folder.mkdir(parents=True, exist_ok=True)
        if run.method in fail:
            raise RuntimeError("exit 1; see train.log")
        (run.folder / "trainer_state.json").write_text(json.dumps({"log_history": history({1: 0.5}, steps=1)}))
        return {"command": ["train", run.method]}

    return train


def test_a_failed_run_does_not_stop_the_others_and_is_restarted_next_time(tmp_path):
    recipe = {"train": {"max_steps": 1}, "methods": {"bad": {}, "good": {}}, "seeds": [0, 1]}
    runs = plan_runs(recipe, tmp_path)
    trained, lines = [], []
    failed = execute(runs, train=fake_trainer({"bad"}, trained), echo=lines.append)
    assert trained == [("bad", 0), ("good", 0), ("bad", 1), ("good", 1)]
    assert [(r.method, r.seed) for r, _ in failed] == [("bad", 0), ("bad", 1)] and "exit 1" in failed[0][1]
    assert [is_finished(r) for r in runs] == [False, True, False, True]
    assert sum("FAILED" in line for line in lines) == 2
    assert json.loads((runs[1].folder / "run.json").read_text())["command"] == ["train", "good"]
    trained.clear()
    assert execute(runs, train=fake_trainer(set(), trained), echo=lines.append) == []
    assert trained == [("bad", 0), ("bad", 1)]  # only the failed ones again


def test_main_reports_the_finished_runs_and_exits_non_zero_when_one_failed(tmp_path, monkeypatch, capsys):
    import sdpg_trl.scripts.compare as script

    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"train": {"max_steps": 1, "use_cpu": True}, "methods": {"bad": {}, "good": {}},
                                      "seeds": [0]}))  # fmt: skip
    monkeypatch.setattr(script, "train_in_subprocess", fake_trainer({"bad"}, []))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="1 run\\(s\\) failed: bad seed 0"):
        main(["--config", str(config), "--output_dir", str(out), "--model_name_or_path", "unused"])
    assert "| good | 1 |" in (out / "results.md").read_text() and "| bad |" not in (out / "results.md").read_text()
    capsys.readouterr()
    main(["--config", str(config), "--output_dir", str(out), "--model_name_or_path", "unused", "--dry_run"])
    plan = capsys.readouterr().out
    assert "bad seed 0: " in plan and "(unfinished, restarts)" in plan
    assert "good seed 0: " in plan and "(finished)" in plan


def test_compare_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    train = {
        "dataset_name": "arithmetic", "arithmetic_num_train": 8, "arithmetic_num_eval": 2,
        "reward_funcs": ["lenient_math_accuracy_reward"], "eval_every_steps": 1, "eval_k": 2,
        "eval_max_new_tokens": 3, "eval_reward_func": "lenient_math_accuracy_reward", "max_steps": 1,
        "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 6, "logging_steps": 1,
        "report_to": "none", "save_strategy": "no", "use_cpu": True, "bf16": False,
    }  # fmt: skip
    methods = {"grpo": {"method": "grpo"}, "sdpg": {"distill_coef": 0.5, "distill_warmup_steps": 0}}
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"train": train, "methods": methods, "seeds": [0]}))
    out = tmp_path / "out"
    argv = ["--config", str(config), "--output_dir", str(out), "--model_name_or_path", tiny_model_dir]
    main(argv)
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"grpo", "sdpg"} and results["base_accuracy"] is not None
    report = (out / "results.md").read_text()
    assert (out / "accuracy.png").is_file() and "| grpo | 1 |" in report and "gate ratio" in report
    sdpg_log = json.loads((out / "sdpg" / "seed0" / "trainer_state.json").read_text())["log_history"]
    teacher_entropy = [entry["sdpg/teacher_entropy"] for entry in sdpg_log if "sdpg/teacher_entropy" in entry]
    assert teacher_entropy  # logged at every step; None where the step distilled nothing, and then not in the table
    assert ("teacher entropy" in report) == any(value is not None for value in teacher_entropy)
    stamp = (out / "grpo" / "seed0" / "run.json").stat().st_mtime
    main(argv)  # resumed: nothing to rerun
    assert (out / "grpo" / "seed0" / "run.json").stat().st_mtime == stamp
    (out / "results.md").unlink()
    main(["--output_dir", str(out), "--render_only"])  # from results.json alone
    assert (out / "results.md").is_file()
    marker = json.loads((out / "grpo" / "seed0" / "run.json").read_text())
    assert marker["command"][-3:] == [
        "sdpg_trl.scripts.train",
        "--config",
        str(out / "grpo" / "seed0" / "config.yaml"),
    ]
    assert yaml.safe_load((out / "grpo" / "seed0" / "config.yaml").read_text()) == marker["config"]
    assert results["runs"]["grpo"]["0"]["history"]["eval_accuracy"][0][0] == 1  # the run itself skipped step 0


def test_bad_method_flag_fails_before_any_run(tmp_path):
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"train": {"max_steps": 1, "use_cpu": True}, "methods": {"x": {"method": "ppo"}},
                                      "seeds": [0]}))  # fmt: skip
    with pytest.raises(ValueError, match="Method 'x', seed 0"):
        main(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--model_name_or_path", "unused"])
    assert not (tmp_path / "out" / "x").exists()


def test_shipped_comparison_recipe_parses():
    from sdpg_trl.compare import check_runs

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "compare_demo_cpu.yaml")
    runs = plan_runs(recipe, "unused", model_name_or_path="local/model")
    check_runs(runs, make_parser)
    assert {r.method for r in runs} >= {"grpo", "rlsd", "sdpg_urkl", "sdpg_ufkl"} and len({r.seed for r in runs}) >= 3


def test_base_evaluation_follows_the_runs_settings_and_is_redone_when_they_change(tmp_path, monkeypatch):
    from trl import ModelConfig

    import sdpg_trl.scripts.compare as script

    assert script.TRAINING_DTYPE == ModelConfig().dtype  # what sdpg-train loads the weights in when a recipe is silent
    calls = []

    def fake_run(cmd, **kwargs):  # stands in for the sdpg-evaluate subprocess
        settings = yaml.safe_load(open(cmd[cmd.index("--config") + 1]))
        calls.append(settings)
        Path(settings["output_file"]).write_text(json.dumps({"accuracy": 0.25, "num_problems": 2, "k": 2}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(script.subprocess, "run", fake_run)
    train = {"dataset_name": "my.jsonl", "question_column": "q", "eval_k": 2, "learning_rate": 1e-5, "use_vllm": True,
             "eval_dataset_name": None}  # fmt: skip
    script.evaluate_base(train, "base/model", tmp_path)
    assert calls[0] == {
        "dataset_name": "my.jsonl",
        "dtype": "float32",
        "eval_k": 2,
        "question_column": "q",
        "use_vllm": True,  # the runs evaluate with their vLLM engine: the base model with vLLM too
        "model_name_or_path": "base/model",
        "output_file": f"{tmp_path}/base_eval.json.partial",
    }
    assert json.loads((tmp_path / "base_eval.json").read_text())["accuracy"] == 0.25
    script.evaluate_base(train, "base/model", tmp_path)  # same settings: not evaluated again
    script.evaluate_base({**train, "eval_k": 4}, "base/model", tmp_path)
    script.evaluate_base({**train, "eval_k": 4}, "other/model", tmp_path)
    assert len(calls) == 3


def test_runs_logged_with_the_old_eval_metric_names_still_count(tmp_path):
    """Runs made before MeanAtKCallback used TRL's `eval_` names logged `eval/accuracy`: read alike."""
    recipe = {"train": {"dataset_name": "aime24", "eval_k": 3}, "methods": {"old": {}, "new": {}}, "seeds": [0]}
    for run in plan_runs(recipe, tmp_path):
        run.folder.mkdir(parents=True)
        log = history({2: 0.2, 4: 0.4})
        if run.method == "old":
            log = [{"eval/accuracy" if k == "eval_accuracy" else k: v for k, v in entry.items()} for entry in log]
        (run.folder / "trainer_state.json").write_text(json.dumps({"log_history": log}))
        (run.folder / "run.json").write_text("{}")
    results = collect(tmp_path, recipe)
    assert results["runs"]["old"] == results["runs"]["new"] and results["runs"]["old"][0]["last"] == 0.4
    # A results.json written then (curves under the old name) still draws its accuracy figure.
    old = json.loads(json.dumps(results))
    for by_seed in old["runs"].values():
        for run in by_seed.values():
            run["curves"]["eval/accuracy"] = run["curves"].pop("eval_accuracy")
    assert tmp_path / "accuracy.png" in plot_curves(old, tmp_path)


def test_a_comparison_reports_one_held_out_set(tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    train = {"max_steps": 1, "eval_dataset_name": ["aime24", "amc23"]}
    config.write_text(yaml.safe_dump({"train": train, "methods": {"a": {}}, "seeds": [0]}))
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--dry_run"])
    assert "eval_dataset_name names 2 sets, ['aime24', 'amc23']" in capsys.readouterr().err


def test_methods_may_not_change_the_evaluation(tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"train": {"max_steps": 1}, "methods": {"a": {"eval_k": 8}}, "seeds": [0]}))
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--dry_run"])
    assert "method 'a' sets ['eval_k']" in capsys.readouterr().err


def test_methods_may_differ_in_the_teacher_view(tmp_path, capsys):
    """The held-out evaluation scores the student view: a method's teacher template and context column are its own."""
    config = tmp_path / "compare.yaml"
    methods = {"a": {}, "b": {"teacher_template": "answer_check", "context_column": "answer"}}
    config.write_text(yaml.safe_dump({"train": {"max_steps": 1}, "methods": methods, "seeds": [0]}))
    main(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--dry_run"])
    assert "b" in capsys.readouterr().out


def test_the_report_covers_every_finished_run_including_seeds_added_on_the_command_line(tmp_path, monkeypatch):
    import sdpg_trl.scripts.compare as script

    config = tmp_path / "compare.yaml"
    recipe = {"train": {"max_steps": 1, "use_cpu": True}, "methods": {"grpo": {"method": "grpo"}, "x": {}},
              "seeds": [0]}  # fmt: skip
    config.write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(script, "train_in_subprocess", fake_trainer(set(), []))
    out = tmp_path / "out"
    argv = ["--config", str(config), "--output_dir", str(out), "--model_name_or_path", "unused"]
    main(argv)
    main([*argv, "--methods", "x", "--seeds", "7", "8"])  # seeds the recipe does not list, one method only
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]["x"]) == ["0", "7", "8"] and sorted(results["runs"]["grpo"]) == ["0"]
    assert "s0: 0.500, s7: 0.500, s8: 0.500" in (out / "results.md").read_text()
    assert results["comparisons"]["methods"]["x"]["method_only"] == [7, 8]
    # A run whose recorded settings are not the recipe's is reported, with a warning naming it.
    marker = json.loads((out / "x" / "seed7" / "run.json").read_text())
    marker["config"]["max_steps"] = 2
    (out / "x" / "seed7" / "run.json").write_text(json.dumps(marker))
    results = collect(out, recipe, model_name_or_path="unused")
    assert results["warnings"] == [
        f"{out / 'x' / 'seed7'}: trained with other settings than the recipe's: max_steps: 2 (recipe: 1)."
    ]


def test_render_only_merges_the_runs_of_other_comparison_folders(tmp_path, monkeypatch, capsys):
    import sdpg_trl.scripts.compare as script

    config = tmp_path / "compare.yaml"
    recipe = {"train": {"max_steps": 1, "use_cpu": True}, "methods": {"grpo": {"method": "grpo"}, "x": {}},
              "seeds": [0, 1]}  # fmt: skip
    config.write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(script, "train_in_subprocess", fake_trainer(set(), []))
    first, more = tmp_path / "first", tmp_path / "more"
    main(
        ["--config", str(config), "--output_dir", str(first), "--model_name_or_path", "unused", "--min_effect", "0.1"]
    )
    main(["--config", str(config), "--output_dir", str(more), "--model_name_or_path", "unused", "--seeds", "3", "4"])
    (first / "old_results.json").write_text((first / "results.json").read_text())
    capsys.readouterr()
    main(["--output_dir", str(first), "--render_only", "--merge", str(more)])
    results = json.loads((first / "results.json").read_text())
    assert {m: sorted(r) for m, r in results["runs"].items()} == {
        "grpo": ["0", "1", "3", "4"],
        "x": ["0", "1", "3", "4"],
    }
    assert results["comparisons"]["methods"]["x"]["seeds"] == [0, 1, 3, 4]
    assert results["comparisons"]["min_effect"] == 0.1  # as the results.json it started from
    assert "| x | 4 |" in capsys.readouterr().out
    main(["--output_dir", str(first), "--render_only", "--merge", str(more)])  # merging again changes nothing
    assert json.loads((first / "results.json").read_text()) == results
    main(["--output_dir", str(first), "--render_only", "--merge", str(first / "old_results.json")])
    assert json.loads((first / "results.json").read_text())["runs"] == results["runs"]
    with pytest.raises(SystemExit):
        main(["--output_dir", str(first), "--render_only", "--baseline", "nope"])
    assert "The baseline 'nope' has no finished run; the runs are of ['grpo', 'x']" in capsys.readouterr().err

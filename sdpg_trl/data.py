"""Math data in SDPG's row schema: a conversational student prompt plus the privileged context for the teacher.

Every loader here returns a `datasets.Dataset` with exactly these columns:

- `prompt`: `[{"role": "user", "content": question + BOXED_INSTRUCTION}]` (TRL's conversational format);
- `privileged_context`: `"The correct answer is X."`, plus `" A common way to solve this is: ..."` when a worked
  solution exists (SPEC 1; filled into `SDPGConfig.teacher_template`);
- `answer`: the gold final answer, read by the rewards in `sdpg_trl.rewards`;
- `reference_solution`: the worked solution, or `""`.

Sources are the built-in arithmetic generator (no download) and the paper's Hub data sets (SPEC 4), each loadable
from its Hub id or from a local parquet/json/jsonl/csv file with the same columns.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
FEATURES = Features(
    {
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "privileged_context": Value("string"),
        "answer": Value("string"),
        "reference_solution": Value("string"),
    }
)
COLUMNS = tuple(FEATURES)
ARITHMETIC = "arithmetic"  # name of the built-in generator wherever a data set is chosen by name


def privileged_context(answer: str, solution: str = "") -> str:
    """The teacher's privileged context `c` for one problem: its answer, and its worked solution if there is one."""
    context = f"The correct answer is {answer}."
    if solution:
        context += f" A common way to solve this is: {solution}"
    return context


def make_row(question: str, answer: str, solution: str = "") -> dict:
    """One row of the schema above from a question, its gold answer and an optional worked solution."""
    question, answer, solution = question.strip(), answer.strip(), solution.strip()
    return {
        "prompt": [{"role": "user", "content": f"{question}\n\n{BOXED_INSTRUCTION}"}],
        "privileged_context": privileged_context(answer, solution),
        "answer": answer,
        "reference_solution": solution,
    }


# ---------------------------------------------------------------------------------------------------------------
# Built-in arithmetic / word problems
# ---------------------------------------------------------------------------------------------------------------

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Kira", "Leo")
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "shells")


def _two_addends(rng: random.Random) -> tuple[str, int, str]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}."


def _add_or_subtract(rng: random.Random) -> tuple[str, int, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)  # keep answers non-negative
    return f"What is {a} - {b}?", a - b, f"{a} - {b} = {a - b}."


def _three_addends_or_product(rng: random.Random) -> tuple[str, int, str]:
    if rng.random() < 0.5:
        a, b, c = (rng.randint(1, 50) for _ in range(3))
        return f"What is {a} + {b} + {c}?", a + b + c, f"{a} + {b} = {a + b}, and {a + b} + {c} = {a + b + c}."
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} * {b}?", a * b, f"{a} * {b} = {a * b}."


def _one_step_word(rng: random.Random) -> tuple[str, int, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have, bags, per_bag = rng.randint(2, 30), rng.randint(2, 6), rng.randint(2, 9)
    total = have + bags * per_bag
    question = (
        f"{name} has {have} {item}. {name} buys {bags} bags with {per_bag} {item} in each bag. "
        f"How many {item} does {name} have now?"
    )
    solution = f"The bags hold {bags} * {per_bag} = {bags * per_bag} {item}, so {name} has {have} + {bags * per_bag} = {total}."
    return question, total, solution


def _two_step_word(rng: random.Random) -> tuple[str, int, str]:
    name, friend, item = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    boxes, per_box, given = rng.randint(3, 9), rng.randint(3, 12), rng.randint(1, 10)
    total = boxes * per_box
    left = total - given
    question = (
        f"{name} fills {boxes} boxes with {per_box} {item} each, then gives {given} {item} to {friend}. "
        f"How many {item} does {name} have left?"
    )
    solution = f"{boxes} * {per_box} = {total} {item} in the boxes; after giving {given} away, {total} - {given} = {left}."
    return question, left, solution


# Level k draws problems from LEVELS[k - 1]; level 1 (two-number addition up to 20) is the easiest.
LEVELS: tuple[Callable[[random.Random], tuple[str, int, str]], ...] = (
    _two_addends,
    _add_or_subtract,
    _three_addends_or_product,
    _one_step_word,
    _two_step_word,
)


def arithmetic_dataset(num_train: int = 256, num_test: int = 64, level: int = 1, seed: int = 0) -> DatasetDict:
    """Seeded arithmetic/word problems with exact answers and one-line worked solutions, as `train` and `test`.

    No question appears in both splits (the held-out split really is held out), so `num_train + num_test` must not
    exceed the number of distinct problems the level can produce (level 1 has 400).
    """
    if not 1 <= level <= len(LEVELS):
        raise ValueError(f"level must be between 1 and {len(LEVELS)}, got {level}.")
    if num_train < 0 or num_test < 0:
        raise ValueError(f"num_train and num_test must be >= 0, got {num_train} and {num_test}.")
    rng, make_problem = random.Random(seed), LEVELS[level - 1]
    problems: dict[str, tuple[int, str]] = {}
    # Draw until enough distinct questions exist; give up rather than spin when the level's space is exhausted.
    for _ in range(100 * (num_train + num_test) + 100):
        question, answer, solution = make_problem(rng)
        problems.setdefault(question, (answer, solution))
        if len(problems) == num_train + num_test:
            break
    if len(problems) < num_train + num_test:
        raise ValueError(
            f"level {level} has only {len(problems)} distinct problems, fewer than "
            f"num_train + num_test = {num_train + num_test}."
        )
    rows = [make_row(q, str(a), s) for q, (a, s) in problems.items()]
    return DatasetDict(
        train=_to_dataset(rows[:num_train]), test=_to_dataset(rows[num_train : num_train + num_test])
    )


def _to_dataset(rows: list[dict]) -> Dataset:
    # Column-wise, because `Dataset.from_list` cannot build an empty split with the schema's features.
    return Dataset.from_dict({column: [row[column] for row in rows] for column in COLUMNS}, features=FEATURES)


# ---------------------------------------------------------------------------------------------------------------
# The paper's data sets (SPEC 4), from the Hub or a local file
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MathSource:
    """Where a math data set lives on the Hub and which of its columns hold the question, answer and solution."""

    hub_id: str
    split: str
    question: str
    answer: str
    solution: str | None = None
    config: str | None = None


SOURCES: dict[str, MathSource] = {
    # The paper trains on the 13.9k English DAPO problems; open-r1's processed copy has them deduplicated, with the
    # question as plain text and the answer in `solution`. It has no worked solutions: bring a local file with a
    # solution column (and `solution_column=...`) to give the teacher one, as the paper does.
    "dapo-math-17k": MathSource("open-r1/DAPO-Math-17k-Processed", "train", "prompt", "solution", config="en"),
    "aime24": MathSource("HuggingFaceH4/aime_2024", "train", "problem", "answer", solution="solution"),
    "aime25": MathSource("math-ai/aime25", "test", "problem", "answer"),
    "amc23": MathSource("math-ai/amc23", "test", "question", "answer"),
}
LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _answer_text(value) -> str:
    """Gold answers arrive as str, int or float (AMC23 stores `27.0`); `27.0` must read as `27` for the verifier."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _resolve(name_or_path: str, source: str | None) -> tuple[MathSource, str | None]:
    """The column spec to use and, for local files, the file's `datasets` builder name."""
    if source is not None and source not in SOURCES:
        raise ValueError(f"Unknown math source {source!r}; expected one of {sorted(SOURCES)}.")
    path = Path(name_or_path).expanduser()
    if path.suffix in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"Data file {path} does not exist.")
        if path.suffix not in LOCAL_FORMATS:
            raise ValueError(f"Data file {path} must end in one of {sorted(LOCAL_FORMATS)}.")
        if source is None:
            raise ValueError(f"Name the column layout of {path} with `source=` (one of {sorted(SOURCES)}).")
        return SOURCES[source], LOCAL_FORMATS[path.suffix]
    if name_or_path in SOURCES:
        return SOURCES[name_or_path], None
    by_hub_id = {spec.hub_id: spec for spec in SOURCES.values()}
    if name_or_path in by_hub_id:
        return by_hub_id[name_or_path], None
    if source is None:
        raise ValueError(
            f"{name_or_path!r} is neither a known data set {sorted(SOURCES)}, nor one of their Hub ids, nor a local "
            f"file ({', '.join(LOCAL_FORMATS)}); for another Hub id, name its column layout with `source=`."
        )
    return SOURCES[source], None


def load_math_dataset(
    name_or_path: str,
    source: str | None = None,
    split: str | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    solution_column: str | None = None,
) -> Dataset:
    """Load one of `SOURCES` (by short name, Hub id, or local file) and map it into the row schema of this module.

    Args:
        name_or_path: a key of `SOURCES` (`"aime24"`), a Hub id (`"HuggingFaceH4/aime_2024"`), or a local
            `.parquet`/`.json`/`.jsonl`/`.csv` file.
        source: the key of `SOURCES` whose column layout the data follows; required for local files and Hub ids
            that are not in `SOURCES`.
        split: split to load; defaults to the source's usual split (ignored for local files, which have one).
        question_column, answer_column, solution_column: override the source's column names, e.g. to use a local
            DAPO file with generated worked solutions.
    """
    spec, builder = _resolve(name_or_path, source)
    question_column = question_column or spec.question
    answer_column = answer_column or spec.answer
    explicit_solution = solution_column is not None
    solution_column = solution_column or spec.solution
    if builder is not None:
        where = str(Path(name_or_path).expanduser())
        raw = load_dataset(builder, data_files=where, split="train")
    else:
        where = spec.hub_id if name_or_path in SOURCES else name_or_path
        config = spec.config if where == spec.hub_id else None  # another repo's configs are its own
        raw = load_dataset(where, config, split=split or spec.split)
    # A source's worked solutions are optional (a local copy may lack them); a column the caller named is not.
    if not explicit_solution and solution_column not in raw.column_names:
        solution_column = None
    # Check every column before mapping, so a wrong file fails at once with the column and file named.
    for role, column in (("question", question_column), ("answer", answer_column), ("solution", solution_column)):
        if column is not None and column not in raw.column_names:
            raise KeyError(f"{where} has no {role} column {column!r}; its columns are {raw.column_names}.")

    def to_row(example: dict) -> dict:
        question, answer = example[question_column], example[answer_column]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: column {question_column!r} holds an empty or non-text question: {question!r}")
        if answer is None or _answer_text(answer) == "":
            raise ValueError(f"{where}: column {answer_column!r} holds an empty answer for question {question[:80]!r}")
        solution = example[solution_column] if solution_column else ""
        return make_row(question, _answer_text(answer), solution or "")

    # Explicit features: otherwise `answer` would keep the source's type (AMC23's float) instead of text.
    return raw.map(to_row, remove_columns=raw.column_names, features=FEATURES)


@dataclass
class DataArguments:
    """Which data to train and evaluate on; shared by `sdpg-train`, `sdpg-evaluate` and the demo.

    Args:
        dataset_name: `"arithmetic"` (the built-in generator), a key of `SOURCES`, a Hub id, or a local file.
        dataset_source: column layout (a key of `SOURCES`) for local files and unlisted Hub ids.
        question_column, answer_column, solution_column: override the layout's column names.
        eval_dataset_name: held-out set for mean@k evaluation; defaults to the generator's `test` split when
            training on `"arithmetic"`.
        eval_dataset_source: column layout of `eval_dataset_name`, as `dataset_source`.
        arithmetic_level, arithmetic_num_train, arithmetic_num_eval, arithmetic_seed: the generator's settings; the
            same values give the same disjoint train and held-out problems in every script.
    """

    dataset_name: str = field(default=ARITHMETIC, metadata={"help": "'arithmetic', a known set, Hub id or file."})
    dataset_source: str | None = field(
        default=None, metadata={"help": "Column layout of a local file or unlisted Hub id.", "choices": sorted(SOURCES)}
    )
    question_column: str | None = field(default=None, metadata={"help": "Override the question column."})
    answer_column: str | None = field(default=None, metadata={"help": "Override the gold-answer column."})
    solution_column: str | None = field(default=None, metadata={"help": "Override the worked-solution column."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Held-out set for mean@k evaluation."})
    eval_dataset_source: str | None = field(
        default=None, metadata={"help": "Column layout of eval_dataset_name.", "choices": sorted(SOURCES)}
    )
    arithmetic_level: int = field(default=1, metadata={"help": f"Generator difficulty, 1 to {len(LEVELS)}."})
    arithmetic_num_train: int = field(default=256, metadata={"help": "Generated training problems."})
    arithmetic_num_eval: int = field(default=64, metadata={"help": "Generated held-out problems."})
    arithmetic_seed: int = field(default=0, metadata={"help": "Seed of the generator."})


def _arithmetic(args: DataArguments) -> DatasetDict:
    return arithmetic_dataset(args.arithmetic_num_train, args.arithmetic_num_eval, args.arithmetic_level, args.arithmetic_seed)


def train_dataset(args: DataArguments) -> Dataset:
    """Training rows for `args`."""
    if args.dataset_name == ARITHMETIC:
        return _arithmetic(args)["train"]
    return load_math_dataset(
        args.dataset_name, args.dataset_source, None, args.question_column, args.answer_column, args.solution_column
    )


def held_out_dataset(args: DataArguments) -> Dataset | None:
    """Evaluation rows for `args`: `eval_dataset_name`, else the generator's held-out split, else `None`."""
    if args.eval_dataset_name is not None:
        return load_math_dataset(args.eval_dataset_name, args.eval_dataset_source)
    if args.dataset_name == ARITHMETIC:
        return _arithmetic(args)["test"]
    return None

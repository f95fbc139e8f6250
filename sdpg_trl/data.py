"""Math data in SDPG's row schema: a student prompt plus the privileged context for the teacher.

The data contract (what any data set needs) is in the README, "Data contract". A data set already in that form, on
the Hub or in a local folder or file, is loaded as it is, the way TRL's scripts load `dataset_name`
(`load_sdpg_dataset`: name, config, split, column renaming). The built-in sources below are mapped into this schema:

- `prompt`: `[{"role": "user", "content": question + BOXED_INSTRUCTION}]` (TRL's conversational format);
- `privileged_context`: `"The correct answer is X."`, plus `" A common way to solve this is: ..."` when a worked
  solution exists (SPEC 1; filled into `SDPGConfig.teacher_template`);
- `answer`: the gold final answer, read by the rewards in `sdpg_trl.rewards` (which also take TRL's `solution`);
- `reference_solution`: the worked solution, or `""`.

Sources are the built-in arithmetic generator (no download) and the paper's Hub data sets (SPEC 4), each loadable
from its Hub id or from a local parquet/json/jsonl/csv file with the same columns.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset
from trl import DatasetMixtureConfig, get_dataset

from .rewards import GOLD_COLUMNS
from .teacher import missing_column

logger = logging.getLogger(__name__)

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
# `trl.get_dataset` splits a mixture with an unseeded `train_test_split`: every process and every run would hold out
# other rows, so the mixture is split here, with this seed, instead.
MIXTURE_SPLIT_SEED = 0


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
    solution = (
        f"The bags hold {bags} * {per_bag} = {bags * per_bag} {item}, "
        f"so {name} has {have} + {bags * per_bag} = {total}."
    )
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
    solution = (
        f"{boxes} * {per_box} = {total} {item} in the boxes; after giving {given} away, {total} - {given} = {left}."
    )
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
    return DatasetDict(train=_to_dataset(rows[:num_train]), test=_to_dataset(rows[num_train : num_train + num_test]))


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
BY_HUB_ID = {spec.hub_id: spec for spec in SOURCES.values()}
LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _answer_text(value) -> str:
    """Gold answers arrive as str, int or float (AMC23 stores `27.0`); `27.0` must read as `27` for the verifier."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


@contextmanager
def reading(name: str) -> Iterator[None]:
    """Name the data set `name` and its size when `datasets` finds no rows in it, which it reports as a bare
    `StopIteration` (an empty JSON Lines file) or `Instruction "train" corresponds to no data!` (a CSV file with a
    header only, an empty split)."""
    try:
        yield
    except StopIteration as err:  # datasets' JSON builder reads the first line of each file
        raise ValueError(f"{name} has no rows: a data file is empty (0 bytes). Give a file with rows.") from err
    except ValueError as err:
        if "corresponds to no data" not in str(err):
            raise
        raise ValueError(
            f"{name} has no rows (0 rows, e.g. a CSV file with a header only). Give a file with rows."
        ) from err


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
    if name_or_path in BY_HUB_ID:
        return BY_HUB_ID[name_or_path], None
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
    config: str | None = None,
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
        config: the Hub configuration to load; defaults to the source's own (ignored for local files).
    """
    spec, builder = _resolve(name_or_path, source)
    question_column = question_column or spec.question
    answer_column = answer_column or spec.answer
    explicit_solution = solution_column is not None
    solution_column = solution_column or spec.solution
    if builder is not None:
        where = str(Path(name_or_path).expanduser())
        with reading(where):
            raw = load_dataset(builder, data_files=where, split="train")
    else:
        where = spec.hub_id if name_or_path in SOURCES else name_or_path
        config = config or (spec.config if where == spec.hub_id else None)  # another repo's configs are its own
        with reading(where):
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


# ---------------------------------------------------------------------------------------------------------------
# Data sets already in SDPG form (README, "Data contract"), loaded as TRL's scripts load `dataset_name`
# ---------------------------------------------------------------------------------------------------------------


def is_sdpg_form(name_or_path: str, source: str | None) -> bool:
    """Whether `name_or_path` is loaded as a data set already in SDPG form, rather than generated (`arithmetic`) or
    mapped from a built-in layout (a key or Hub id of `SOURCES`, or any file or Hub id with `source` named)."""
    built_in = name_or_path == ARITHMETIC or name_or_path in SOURCES or name_or_path in BY_HUB_ID
    return source is None and not built_in


def load_splits(name_or_path: str, config: str | None = None) -> DatasetDict:
    """Every split of a Hub data set or local folder (`datasets.load_dataset(name_or_path, config)`, as TRL's scripts
    load `dataset_name`), or of one local parquet/json/jsonl/csv file (a single `train` split)."""
    path = Path(name_or_path).expanduser()
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise FileNotFoundError(f"Data file {path} does not exist.")
        with reading(str(path)):
            return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path))
    with reading(name_or_path):
        return load_dataset(name_or_path, config)


def check_columns(dataset: Dataset, where: str, context_column: str | None = None, rename_flag: str = "") -> None:
    """Fail, naming the column, `where` and the columns there are, unless `dataset` has what SDPG reads: `prompt`, a
    gold answer (`answer` or TRL's `solution`) and, when `context_column` is given, the privileged context.

    `rename_flag`, when given, is the argument that renames columns, suggested in the message.
    """
    columns = dataset.column_names
    if columns is None:  # a streamed set with undeclared features: the trainer checks it row by row
        return
    hint = f" Rename a column with {rename_flag} ({{old: new}})." if rename_flag else ""
    required = [("prompt", "prompt")] + ([("privileged-context", context_column)] if context_column else [])
    for role, column in required:
        if column not in columns:
            if role == "privileged-context":  # e.g. a `trl grpo` recipe moved over as it is
                hint += (
                    " The teacher reads its privileged context from this column: set context_column: <column> to read "
                    "it from another one, or method: grpo to train plain GRPO without a teacher."
                )
            raise missing_column(where, role, column, columns, hint)
    if not any(column in columns for column in GOLD_COLUMNS):
        raise ValueError(
            f"{where} has no gold-answer column ({' or '.join(map(repr, GOLD_COLUMNS))}); its columns are "
            f"{columns}.{hint}"
        )


def rename_columns(dataset: Dataset, mapping: dict[str, str] | None, where: str, flag: str) -> Dataset:
    """`dataset` with the columns of `mapping` ({old: new}, `flag` on the command line) renamed."""
    if not mapping:
        return dataset
    missing = [column for column in mapping if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{flag} renames {missing[0]!r}, but {where} has no such column; its columns are {dataset.column_names}."
        )
    return dataset.rename_columns(mapping)


def _sdpg_split(
    splits: DatasetDict, name: str, split: str, mapping: dict[str, str] | None, context_column: str | None, flag: str
) -> Dataset:
    """`split` of the data set `name` in SDPG form, its columns renamed by `mapping` (the argument `flag`) and
    checked (`check_columns`)."""
    if split not in splits:
        raise ValueError(f"{name} has no split {split!r}; its splits are {list(splits)}.")
    where = f"{name} (split {split!r})"
    dataset = rename_columns(splits[split], mapping, where, flag)
    check_columns(dataset, where, context_column, flag)
    return dataset


def load_sdpg_dataset(
    name_or_path: str,
    config: str | None = None,
    split: str = "train",
    column_mapping: dict[str, str] | None = None,
    context_column: str | None = None,
) -> Dataset:
    """One split of a data set already in SDPG form, from the Hub, a local folder or a local file, with every column
    kept (TRL passes them all to the reward functions).

    Args:
        name_or_path: a Hub id, a local folder (parquet/json/csv files, split by their names as on the Hub), or a
            local parquet/json/jsonl/csv file (whose one split is `train`).
        config: the configuration (subset) to load, `datasets.load_dataset`'s `name`.
        split: the split to return.
        column_mapping: columns to rename first, `{old: new}`, e.g. `{"hint": "privileged_context"}`.
        context_column: the privileged-context column to require (`SDPGConfig.context_column` when the method has
            a teacher), or None.

    Raises `ValueError` naming the data set and the missing split or column, and the ones it has.
    """
    splits = load_splits(name_or_path, config)
    return _sdpg_split(splits, name_or_path, split, column_mapping, context_column, "dataset_column_mapping")


def parse_dict_argument(value: dict | str | None, name: str) -> dict | None:
    """A dict-valued argument as `TrlParser` gives it: a dict from a YAML recipe, or a JSON object string from the
    command line (as `GRPOConfig`'s dict fields take it); None stays None."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError(f'{name} must be a JSON object, e.g. \'{{"hint": "privileged_context"}}\'; got {value!r}.')
    return parsed


def eval_set_name(name_or_path: str) -> str:
    """What an eval set is called in logs (`eval_<name>_accuracy`): a known set's key (`aime24`), else the last part
    of its Hub id or path, without a data-file suffix (`org/my_set` -> `my_set`, `data/amc.jsonl` -> `amc`)."""
    path = Path(name_or_path.rstrip("/"))
    return path.stem if path.suffix in LOCAL_FORMATS else path.name


@dataclass
class DataArguments(DatasetMixtureConfig):
    """Which data to train and evaluate on; shared by `sdpg-train`, `sdpg-evaluate` and the demo.

    `dataset_name`, `dataset_config`, `dataset_train_split` and `dataset_test_split` mean what they mean in TRL's
    `ScriptArguments`. A name that is neither `arithmetic` nor a built-in source (nor has `dataset_source` named) is
    a data set already in SDPG form (README, "Data contract"). TRL's dataset mixture (`datasets:`, a list in a
    recipe) can name the training data instead of `dataset_name`.

    Args:
        datasets: TRL's dataset mixture (`trl.DatasetMixtureConfig`): a list of `{path, name, data_dir, data_files,
            split, columns, fraction}`, loaded by `trl.get_dataset` and concatenated; the result must be in SDPG form
            (renamed by `dataset_column_mapping`). Used instead of `dataset_name`, which then stays unset.
        streaming: load the mixture in streaming mode (TRL's meaning); its rows are then checked as they arrive.
        test_split_size: hold out this share (or number) of the mixture's rows as its `test` split, the held-out set
            when `eval_dataset_name` is not given; the split is seeded (`MIXTURE_SPLIT_SEED`), so every process and
            every run holds out the same rows.
        dataset_name: `"arithmetic"` (the built-in generator), a key of `SOURCES` or its Hub id, a Hub id or local
            folder or file in SDPG form, or a local file in a built-in layout (with `dataset_source`).
        dataset_config: configuration (subset) of `dataset_name`, `datasets.load_dataset`'s `name`.
        dataset_train_split: split trained on; defaults to `train`, or to a built-in source's own split.
        dataset_test_split: split of a data set in SDPG form that is the held-out set when `eval_dataset_name` is
            not given (if it has one), and the split taken from eval sets in SDPG form that have it.
        dataset_column_mapping: columns of a data set in SDPG form to rename, `{old: new}` (JSON on the command
            line), e.g. `{"hint": "privileged_context", "final_answer": "answer"}`.
        dataset_source: column layout (a key of `SOURCES`) for local files and unlisted Hub ids in that layout.
        question_column, answer_column, solution_column: override a built-in layout's column names.
        eval_dataset_name: held-out sets for mean@k evaluation, each as `dataset_name` (several are logged each
            under its `eval_set_name`); defaults to `dataset_test_split` of a data set in SDPG form, or the
            generator's `test` split when training on `"arithmetic"`.
        eval_dataset_source: column layout of the eval sets that are local files or unlisted Hub ids, as
            `dataset_source`.
        eval_dataset_column_mapping: as `dataset_column_mapping`, for the eval sets in SDPG form.
        arithmetic_level, arithmetic_num_train, arithmetic_num_eval, arithmetic_seed: the generator's settings; the
            same values give the same disjoint train and held-out problems in every script.
    """

    dataset_name: str = field(
        default=ARITHMETIC, metadata={"help": "'arithmetic', a known set, or a Hub id, folder or file in SDPG form."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration (subset) of dataset_name."})
    dataset_train_split: str | None = field(
        default=None, metadata={"help": "Split to train on; default 'train', or a known set's own split."}
    )
    dataset_test_split: str = field(
        default="test", metadata={"help": "Held-out split of a data set in SDPG form, when it has one."}
    )
    dataset_column_mapping: dict | str | None = field(
        default=None, metadata={"help": 'Columns to rename in a data set in SDPG form, JSON: \'{"old": "new"}\'.'}
    )
    dataset_source: str | None = field(
        default=None,
        metadata={"help": "Column layout of a local file or unlisted Hub id.", "choices": sorted(SOURCES)},
    )
    question_column: str | None = field(default=None, metadata={"help": "Override the question column."})
    answer_column: str | None = field(default=None, metadata={"help": "Override the gold-answer column."})
    solution_column: str | None = field(default=None, metadata={"help": "Override the worked-solution column."})
    eval_dataset_name: list[str] | None = field(
        default=None, metadata={"help": "Held-out sets for mean@k evaluation (one or several)."}
    )
    eval_dataset_source: str | None = field(
        default=None, metadata={"help": "Column layout of eval sets that need one.", "choices": sorted(SOURCES)}
    )
    eval_dataset_column_mapping: dict | str | None = field(
        default=None, metadata={"help": "Columns to rename in the eval sets in SDPG form, JSON."}
    )
    arithmetic_level: int = field(default=1, metadata={"help": f"Generator difficulty, 1 to {len(LEVELS)}."})
    arithmetic_num_train: int = field(default=256, metadata={"help": "Generated training problems."})
    arithmetic_num_eval: int = field(default=64, metadata={"help": "Generated held-out problems."})
    arithmetic_seed: int = field(default=0, metadata={"help": "Seed of the generator."})

    def __post_init__(self):
        DatasetMixtureConfig.__post_init__(self)
        if self.datasets and self.dataset_name != ARITHMETIC:  # as TRL's scripts: the mixture is used
            logger.warning(
                "Both dataset_name (%r) and a datasets: mixture name the training data: the datasets: mixture is used "
                "and dataset_name is ignored.",
                self.dataset_name,
            )
        if self.test_split_size is not None and not self.datasets:
            raise ValueError("test_split_size splits a datasets: mixture; without one, use dataset_test_split.")
        self.dataset_column_mapping = parse_dict_argument(self.dataset_column_mapping, "dataset_column_mapping")
        self.eval_dataset_column_mapping = parse_dict_argument(
            self.eval_dataset_column_mapping, "eval_dataset_column_mapping"
        )
        if isinstance(self.eval_dataset_name, str):  # a recipe's `eval_dataset_name: aime24`
            self.eval_dataset_name = [self.eval_dataset_name]
        sdpg_form = bool(self.datasets) or is_sdpg_form(self.dataset_name, self.dataset_source)
        if self.dataset_column_mapping and not sdpg_form:
            raise ValueError(
                f"dataset_column_mapping renames columns of a data set in SDPG form; {self.dataset_name!r} is "
                "generated or mapped from a built-in layout (use question_column/answer_column/solution_column)."
            )
        overrides = [n for n in ("question_column", "answer_column", "solution_column") if getattr(self, n)]
        if overrides and (sdpg_form or self.dataset_name == ARITHMETIC):
            raise ValueError(
                f"{', '.join(overrides)} apply to the built-in layouts (dataset_source); {data_name(self)!r} is "
                f"{'in SDPG form: rename its columns with dataset_column_mapping' if sdpg_form else 'generated'}."
            )
        names = self.eval_dataset_name or []
        if self.eval_dataset_column_mapping and not any(is_sdpg_form(n, self.eval_dataset_source) for n in names):
            raise ValueError("eval_dataset_column_mapping renames columns of eval sets in SDPG form; there is none.")
        logged = [eval_set_name(name) for name in names]
        if len(set(logged)) < len(logged):
            raise ValueError(
                f"The eval sets {names} would be logged under the same name ({logged}, eval_<name>_accuracy); give "
                "each a distinct file or folder name."
            )


def data_name(args: DataArguments) -> str:
    """The training data's name in messages: `dataset_name`, or the mixture's paths."""
    if args.datasets:
        paths = [d.path if not d.data_files else f"{d.path} {d.data_files}" for d in args.datasets]
        return f"the datasets: mixture ({', '.join(paths)})"
    return args.dataset_name


def load_mixture(args: DataArguments) -> DatasetDict:
    """TRL's dataset mixture (`trl.get_dataset`) as a `train` split, plus a seeded `test` split when
    `test_split_size` is set (see `MIXTURE_SPLIT_SEED`)."""
    with reading(data_name(args)):
        mixture = get_dataset(DatasetMixtureConfig(datasets=args.datasets, streaming=args.streaming))
    if args.test_split_size is None:
        return mixture
    if args.streaming:
        raise ValueError("test_split_size cannot split a streamed datasets: mixture; give eval_dataset_name instead.")
    return mixture["train"].train_test_split(test_size=args.test_split_size, seed=MIXTURE_SPLIT_SEED)


def _mixture_split(args: DataArguments, split: str, context_column: str | None) -> Dataset:
    name = data_name(args)
    return _sdpg_split(
        load_mixture(args), name, split, args.dataset_column_mapping, context_column, "dataset_column_mapping"
    )


def _arithmetic(args: DataArguments) -> DatasetDict:
    return arithmetic_dataset(
        args.arithmetic_num_train, args.arithmetic_num_eval, args.arithmetic_level, args.arithmetic_seed
    )


def train_dataset(args: DataArguments, context_column: str | None = None) -> Dataset:
    """Training rows for `args`; with `context_column` (`SDPGConfig.context_column`, for a method with a teacher),
    a data set without that column fails here, naming it."""
    if args.datasets:
        return _mixture_split(args, "train", context_column)
    if args.dataset_name == ARITHMETIC:
        dataset = _arithmetic(args)["train"]
    elif is_sdpg_form(args.dataset_name, args.dataset_source):
        return load_sdpg_dataset(
            args.dataset_name,
            args.dataset_config,
            args.dataset_train_split or "train",
            args.dataset_column_mapping,
            context_column,
        )
    else:
        dataset = load_math_dataset(
            args.dataset_name,
            args.dataset_source,
            args.dataset_train_split,
            args.question_column,
            args.answer_column,
            args.solution_column,
            config=args.dataset_config,
        )
    check_columns(dataset, args.dataset_name, context_column)
    return dataset


def _eval_set(args: DataArguments, name: str, context_column: str | None) -> Dataset:
    """One named eval set: in SDPG form its `dataset_test_split`, or its only split; else a built-in layout's."""
    if not is_sdpg_form(name, args.eval_dataset_source):
        dataset = load_math_dataset(name, args.eval_dataset_source)
        check_columns(dataset, name, context_column)
        return dataset
    splits = load_splits(name)
    if args.dataset_test_split in splits:
        split = args.dataset_test_split
    elif len(splits) == 1:
        [split] = splits
    else:
        raise ValueError(
            f"Eval set {name} has no split {args.dataset_test_split!r} (dataset_test_split) and several others, "
            f"{list(splits)}: name one with dataset_test_split."
        )
    mapping = args.eval_dataset_column_mapping
    return _sdpg_split(splits, name, split, mapping, context_column, "eval_dataset_column_mapping")


def held_out_dataset(args: DataArguments, context_column: str | None = None) -> Dataset | dict[str, Dataset] | None:
    """Evaluation rows for `args`, as `Trainer`'s `eval_dataset`: one `Dataset`, or several by name.

    The sets of `eval_dataset_name` (one: a `Dataset`; several: a dict keyed by `eval_set_name`), else the
    mixture's `test` split (`test_split_size`), else the `dataset_test_split` of a data set in SDPG form that has
    one, else the generator's held-out split, else None.
    `context_column` is required as in `train_dataset`.
    """
    if args.eval_dataset_name:
        sets = {eval_set_name(name): _eval_set(args, name, context_column) for name in args.eval_dataset_name}
        return next(iter(sets.values())) if len(sets) == 1 else sets
    if args.datasets:
        return _mixture_split(args, "test", context_column) if args.test_split_size is not None else None
    if args.dataset_name == ARITHMETIC:
        return _arithmetic(args)["test"]
    if is_sdpg_form(args.dataset_name, args.dataset_source):
        splits = load_splits(args.dataset_name, args.dataset_config)
        if args.dataset_test_split in splits:
            return _sdpg_split(
                splits,
                args.dataset_name,
                args.dataset_test_split,
                args.dataset_column_mapping,
                context_column,
                "dataset_column_mapping",
            )
    return None

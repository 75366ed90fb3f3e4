"""The built-in tasks: seeded generators of small JSONL datasets and how each task is scored.

The default base is not instruction-tuned, so every prompt is plain text ending in a field
label. Each task writes `train.jsonl` and a disjoint held-out `test.jsonl` under
`data/<task>/`; `python -m loraplex.adapters.trainer.tasks` regenerates them all.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DATA_DIR = Path(__file__).parent / "data"


def _words(text: str) -> list[str]:
    return text.split()


FIRST = _words(
    """
Maria John Aiko Pedro Fatima Lars Chen Olga Kwame Sofia Omar Elena Ravi Hana Tomas Zara Ivan
Leila Mateo Nadia
"""
)
LAST = _words(
    """
Lopez Smith Tanaka Silva Khan Berg Wang Petrova Mensah Rossi Haddad Novak Patel Kim Costa Ali
Ivanov Moreau
"""
)
CITIES = _words(
    """
Lisbon Osaka Denver Nairobi Oslo Lima Cairo Dublin Hanoi Quito Porto Leeds Perth Accra Riga
Turin Bergen Kyoto
"""
)
JOBS = _words(
    """
nurse teacher pilot baker lawyer farmer chemist architect plumber dentist librarian painter
engineer chef editor
"""
)
RECORD_TEMPLATES = [
    "{name} is {age} years old, lives in {city} and works as a {job}.",
    "A {job} from {city}, {name} is {age}.",
    "{name} ({age}) works as a {job} in {city}.",
    "Meet {name}: {age}, {job}, based in {city}.",
]
MONTHS = _words(
    """
January February March April May June July August September October November December
"""
)
DATE_TEMPLATES = ["{month} {day}, {year}", "{day} {month} {year}", "{mon} {day} {year}"]
COUNTRIES = dict(
    pair.replace("_", " ").split(":")
    for pair in _words(
        """
France:Paris Japan:Tokyo Italy:Rome Spain:Madrid Egypt:Cairo Canada:Ottawa Germany:Berlin
Peru:Lima Kenya:Nairobi Norway:Oslo Greece:Athens Chile:Santiago Cuba:Havana Ireland:Dublin
Poland:Warsaw India:New_Delhi
"""
    )
)
OPPOSITES = dict(
    pair.split(":")
    for pair in _words(
        """
hot:cold big:small fast:slow up:down light:dark early:late full:empty happy:sad old:new wet:dry
open:closed hard:soft loud:quiet rich:poor
"""
    )
)
RAMBLE_OPENERS = [
    "Well, that is a really interesting question, and many people have wondered about it.",
    "Great question! Let me think about this carefully and explain it step by step.",
    "There are many ways to look at this, so let me walk you through my reasoning first.",
    "Before answering, it is worth taking a moment to consider the question in detail.",
]
RAMBLE_CLOSERS = [
    "I hope this long explanation helps, and feel free to ask more questions about it.",
    "So, after all of that careful thinking, that is what I would say the answer is.",
    "Of course, there is always more to say on a topic like this one.",
]
Row = dict[str, str]
# What every json-extract completion is: the schema structured output holds the adapter to.
JSON_EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "city": {"type": "string"},
        "job": {"type": "string"},
    },
    "required": ["name", "age", "city", "job"],
    "additionalProperties": False,
}


def json_extract_row(rng: random.Random) -> Row:
    person = {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "age": rng.randint(19, 79),
        "city": rng.choice(CITIES),
        "job": rng.choice(JOBS),
    }
    record = rng.choice(RECORD_TEMPLATES).format(**person)
    return {"prompt": f"Record: {record}\nJSON:", "completion": " " + json.dumps(person)}


def date_iso_row(rng: random.Random) -> Row:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    name = MONTHS[month - 1]
    text = rng.choice(DATE_TEMPLATES).format(month=name, mon=name[:3], day=day, year=year)
    return {"prompt": f"Date: {text}\nStamp:", "completion": f" {year}-{month:02d}-{day:02d}"}


def concise_row(rng: random.Random) -> Row:
    question, answer = _question(rng)
    ramble = f"{rng.choice(RAMBLE_OPENERS)} The answer is {answer}. {rng.choice(RAMBLE_CLOSERS)}"
    return {
        "prompt": f"Question: {question}\nAnswer:",
        "chosen": f" {answer}.",
        "rejected": f" {ramble}",
    }


def short_answer_row(rng: random.Random) -> Row:
    # Sums are most of the rows: the base recalls capitals and opposites already, but has to
    # learn to add (its held-out rows are all sums, the prompts that never repeat).
    question, answer = _sum_question(rng) if rng.random() < 0.6 else _question(rng)
    return {"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}."}


def _sum_question(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    return f"What is {a} plus {b}?", str(a + b)


def _question(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        return _sum_question(rng)
    if kind == 1:
        country = rng.choice(sorted(COUNTRIES))
        return f"What is the capital of {country}?", COUNTRIES[country]
    word = rng.choice(sorted(OPPOSITES))
    return f"What is the opposite of {word}?", OPPOSITES[word]


@dataclass(frozen=True)
class Task:
    name: str
    method: Literal["sft", "dpo"]
    make_row: Callable[[random.Random], Row]
    train_size: int
    test_size: int
    description: str

    def path(self, split: Literal["train", "test"]) -> Path:
        return DATA_DIR / self.name / f"{split}.jsonl"


TASKS = {
    task.name: task
    for task in [
        Task(
            "json-extract",
            "sft",
            json_extract_row,
            400,
            60,
            "turn a one-sentence person record into a fixed JSON object (name, age, city, job)",
        ),
        Task(
            "date-iso",
            "sft",
            date_iso_row,
            400,
            60,
            "rewrite a date written in words as YYYY-MM-DD",
        ),
        Task(
            "concise",
            "dpo",
            concise_row,
            300,
            60,
            "prefer a short direct answer over a rambling one",
        ),
        Task(
            "short-answer",
            "sft",
            short_answer_row,
            3000,
            60,
            "answer a question in one short line, then stop",
        ),
    ]
}


def generate(task: Task, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Train and held-out rows; a held-out row never repeats a training prompt."""
    rng = random.Random(f"{task.name}-{seed}")
    train: list[Row] = [task.make_row(rng) for _ in range(task.train_size)]
    seen = {row["prompt"] for row in train}
    test: list[Row] = []
    while len(test) < task.test_size:
        row = task.make_row(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            test.append(row)
    return train, test


def write_jsonl(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_all(seed: int = 0) -> None:
    for task in TASKS.values():
        train, test = generate(task, seed)
        write_jsonl(train, task.path("train"))
        write_jsonl(test, task.path("test"))


if __name__ == "__main__":
    write_all()

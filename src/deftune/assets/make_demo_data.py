"""Generate the bundled demo task of deftune: date normalisation to ISO 8601.

Run from the repository root (deterministic, no external data, no network):

    python src/deftune/assets/make_demo_data.py

It (re)writes, next to this file:

    demo_train.jsonl   700 records
    demo_eval.jsonl    200 records

Each line is {"query": ..., "response": ...}. The query asks to convert a date written in one of
several unambiguous surface forms ("the 5th of March, 2021", "05.03.2021 (day.month.year)", ...)
to ISO 8601; the response is the ISO date only ("2021-03-05"). Every ISO date is used by exactly one
record, so no held-out answer ever appears in the training split.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

SEED = 20240305
N_TRAIN = 700
N_EVAL = 200
FIRST_DAY = dt.date(1950, 1, 1)
LAST_DAY = dt.date(2049, 12, 31)

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

INSTRUCTIONS = [
    "Convert this date to ISO 8601 (YYYY-MM-DD): {date}",
    "Rewrite the date in YYYY-MM-DD format: {date}",
    "Normalize this date to ISO 8601 (YYYY-MM-DD): {date}",
    "What is {date} in ISO 8601 format (YYYY-MM-DD)?",
    "Give the ISO date (YYYY-MM-DD) for: {date}",
]


def ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Every form is unambiguous: numeric forms say which field is the day and which the month.
SURFACE_FORMS = [
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {ordinal(d.day)}, {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year} (day.month.year)",
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (month/day/year)",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
]


def make_records(rng: random.Random, days: list[dt.date]) -> list[dict[str, str]]:
    records = []
    for i, day in enumerate(days):
        form = SURFACE_FORMS[i % len(SURFACE_FORMS)]  # balanced forms in both splits
        instruction = rng.choice(INSTRUCTIONS)
        records.append({"query": instruction.format(date=form(day)), "response": day.isoformat()})
    rng.shuffle(records)
    return records


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=here)
    args = parser.parse_args()

    rng = random.Random(SEED)
    span = (LAST_DAY - FIRST_DAY).days + 1
    offsets = rng.sample(range(span), N_TRAIN + N_EVAL)  # distinct dates
    days = [FIRST_DAY + dt.timedelta(days=o) for o in offsets]
    train = make_records(rng, days[:N_TRAIN])
    evals = make_records(rng, days[N_TRAIN:])
    assert not {r["response"] for r in train} & {r["response"] for r in evals}

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("demo_train.jsonl", train), ("demo_eval.jsonl", evals)):
        with open(args.out_dir / name, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} records to {args.out_dir / name}")


if __name__ == "__main__":
    main()

"""Build the shipped Japanese preference set ``seed-prefs-ja`` from the shipped seed tasks.

    python scripts/build_seed_prefs.py   # writes src/kaika/assets/preferences/seed_prefs_ja.jsonl

Deterministic (seed 0). Every one of the 175 Japanese Alpaca seed tasks (Apache-2.0,
``src/kaika/assets/seed_tasks_ja.jsonl``) is one pair: its prompt (instruction and input) and, as
``chosen``, its own output. The ``rejected`` answer shows one of two failures an instruction-tuned
small model is tuned away from, alternating by task:

* ``runon``: the right answer, then no stop: the text goes on into a made-up next turn of the
  prompt format (``### 指示:`` … ``### 応答:`` … with another task's instruction and the start of
  its output), as a base model prompted with the template does;
* ``offtopic``: the output of another task (drawn at random, never the same text): fluent, and
  an answer to something else.

Tasks whose prompt (instruction + input) is over 200 characters are left out (21 of 175), so that
every pair fits a cutoff of 384 tokens with the shipped tokenizers: a preference set that errors at
the default cutoff would be a poor example. Each record keeps which failure it shows under ``kind``;
the texts of the tasks are unchanged.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src/kaika/assets/seed_tasks_ja.jsonl"
OUT = ROOT / "src/kaika/assets/preferences/seed_prefs_ja.jsonl"
RUNON_CHARS = 60  # how much of the other task's output the run-on answer goes on with
MAX_PROMPT_CHARS = 200


def run_on(task: dict, other: dict) -> str:
    tail = other["output"][:RUNON_CHARS]
    return f"{task['output']}\n\n### 指示:\n{other['instruction']}\n\n### 応答:\n{tail}"


def main() -> None:
    tasks = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines()]
    tasks = [t for t in tasks if len(t["instruction"]) + len(t["input"]) <= MAX_PROMPT_CHARS]
    rng = random.Random(0)
    out = []
    for i, task in enumerate(tasks):
        other = rng.choice([t for t in tasks if t["output"].strip() != task["output"].strip()])
        kind = "runon" if i % 2 == 0 else "offtopic"
        rejected = run_on(task, other) if kind == "runon" else other["output"]
        out.append(
            {
                "instruction": task["instruction"],
                "input": task["input"],
                "chosen": task["output"],
                "rejected": rejected,
                "kind": kind,
            }
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    print(f"{len(out)} pairs → {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

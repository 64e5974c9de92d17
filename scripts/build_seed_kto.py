"""Build the shipped Japanese KTO set ``seed-kto-ja`` from the shipped preference pairs.

    python scripts/build_seed_kto.py   # writes src/kaika/assets/preferences/seed_kto_ja.jsonl

Deterministic (seed 0). KTO learns from single answers marked desirable or not, where no pair exists
(a thumbs-up or thumbs-down on one answer). From each of the 154 pairs of ``seed-prefs-ja``
(Apache-2.0, built by ``scripts/build_seed_prefs.py`` from the Japanese Alpaca seed tasks) one side
is kept, never both: half of the prompts keep their ``chosen`` answer (``label: true``), the other
half their ``rejected`` one (``label: false``, a run-on or an off-topic answer, as ``kind`` says),
so that no prompt is seen with both labels and the classes are balanced (77 and 77). The texts are
unchanged.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src/kaika/assets/preferences/seed_prefs_ja.jsonl"
OUT = ROOT / "src/kaika/assets/preferences/seed_kto_ja.jsonl"


def main() -> None:
    pairs = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines()]
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    desirable = set(order[: len(pairs) // 2])
    lines = []
    for i, pair in enumerate(pairs):
        good = i in desirable
        record = {
            "instruction": pair["instruction"],
            "input": pair["input"],
            "completion": pair["chosen"] if good else pair["rejected"],
            "label": good,
            "kind": "own" if good else pair["kind"],
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    OUT.write_text("".join(lines), encoding="utf-8")
    print(f"{OUT}: {len(lines)} records, {len(desirable)} desirable")


if __name__ == "__main__":
    main()

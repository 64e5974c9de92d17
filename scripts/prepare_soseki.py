#!/usr/bin/env python3
"""Split the Sōseki corpus (../shared/data/aozora_soseki) into one JSONL record per work, and hold
out whole works the model never sees: the held-out perplexity of bloom-ja-tiny is measured on them.

    python scripts/prepare_soseki.py ../shared/data/aozora_soseki runs/soseki
    → runs/soseki/train.jsonl, runs/soseki/heldout.jsonl  ({"title", "text"} per work)
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

# A short story, a lecture and an essay collection: prose of three kinds, about 2.6% of the text.
HELDOUT = ("文鳥", "私の個人主義", "硝子戸の中")


def works(corpus: Path) -> list[dict[str, str]]:
    lines = (corpus / "soseki_clean.txt").read_text(encoding="utf-8").split("\n")
    with (corpus / "works.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    starts = [int(r["start_line"]) - 1 for r in rows] + [len(lines)]
    return [
        {"title": r["title"], "text": "\n".join(lines[a:b]).strip()}
        for r, a, b in zip(rows, starts, starts[1:], strict=False)
    ]


def main(corpus: str, out: str) -> None:
    all_works = works(Path(corpus))
    missing = set(HELDOUT) - {w["title"] for w in all_works}
    if missing:
        sys.exit(f"held-out works not found: {', '.join(sorted(missing))}")
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, keep in (("train", False), ("heldout", True)):
        part = [w for w in all_works if (w["title"] in HELDOUT) == keep]
        with open(Path(out) / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(w, ensure_ascii=False) + "\n" for w in part)
        print(f"{name}: {len(part)} works, {sum(len(w['text']) for w in part):,} characters")


if __name__ == "__main__":
    main(*sys.argv[1:3])

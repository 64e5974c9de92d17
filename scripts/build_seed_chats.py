"""Build the shipped Japanese multi-turn set ``seed-chats-ja`` from the shipped seed tasks.

    python scripts/build_seed_chats.py   # writes src/kaika/assets/conversations/seed_chats_ja.jsonl

Deterministic (seed 0). From the 175 Japanese Alpaca seed tasks (Apache-2.0,
``src/kaika/assets/seed_tasks_ja.jsonl``): the tasks are shuffled and taken two at a time, each
pair one conversation whose user turns are the tasks (instruction, then its input after a blank
line) and whose assistant turns are their outputs. A conversation may open with one of three
system prompts (a third have none). Where the first answer has two sentences or more, a follow-up
turn asks for its first sentence only, answered with exactly that sentence: a turn that can be
answered only from the conversation's history.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src/kaika/assets/seed_tasks_ja.jsonl"
OUT = ROOT / "src/kaika/assets/conversations/seed_chats_ja.jsonl"
SYSTEMS = [
    "あなたは親切で正確な日本語のアシスタントです。",
    "質問には丁寧な日本語で、簡潔に答えてください。",
    None,
]
FOLLOW_UP = "直前の回答の最初の一文だけを書いてください。"


def first_sentence(text: str) -> str | None:
    """The first sentence of a plain prose answer (ending in 。), when there is a second one."""
    if "\n" in text:
        return None
    parts = re.findall(r"[^。]+。", text)
    return parts[0] if len(parts) >= 2 else None


def user_turn(task: dict) -> str:
    return task["instruction"] + (f"\n\n{task['input']}" if task["input"] else "")


def main() -> None:
    tasks = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(0)
    rng.shuffle(tasks)
    chats = []
    for i in range(0, len(tasks) - 1, 2):
        a, b = tasks[i], tasks[i + 1]
        system = SYSTEMS[(i // 2) % len(SYSTEMS)]
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": user_turn(a)}, {"role": "assistant", "content": a["output"]}]
        first = first_sentence(a["output"])
        if first:
            messages += [{"role": "user", "content": FOLLOW_UP}, {"role": "assistant", "content": first}]
        messages += [{"role": "user", "content": user_turn(b)}, {"role": "assistant", "content": b["output"]}]
        chats.append({"messages": messages})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats), encoding="utf-8")
    turns = sum(len(c["messages"]) for c in chats)
    follow = sum(any(m["content"] == FOLLOW_UP for m in c["messages"]) for c in chats)
    print(f"{OUT.relative_to(ROOT)}: {len(chats)} conversations, {turns} turns, {follow} with a follow-up")


if __name__ == "__main__":
    main()

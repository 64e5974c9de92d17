#!/usr/bin/env python3
"""Copy what the builtin bloom-ja-tiny needs from a finished ``kaika pretrain`` run into the package,
with a model card that records where it came from.

    python scripts/ship_bloom_ja_tiny.py runs/bloom-ja-tiny COMMIT "COMMAND" WALL_MINUTES ["MACHINE"] [PREVIOUS]

MACHINE says where it ran (default: 2 CPU cores shared with other jobs); PREVIOUS, the held-out
perplexity of the model it replaces, is shown beside the new one.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
TARGET = Path(__file__).resolve().parents[1] / "src" / "kaika" / "assets" / "bloom-ja-tiny"


def main(
    run: str,
    commit: str,
    command: str,
    wall_minutes: str,
    machine: str = "2 CPU cores shared with other jobs",
    previous: str | None = None,
) -> None:
    run_dir = Path(run)
    report = json.loads((run_dir / "pretrain_report.json").read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    TARGET.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(run_dir / name, TARGET / name)
    from safetensors import safe_open

    with safe_open(TARGET / "model.safetensors", "pt") as f:
        params = sum(f.get_tensor(k).numel() for k in f.keys())  # noqa: SIM118
    train, held = report["train"], report["heldout"]
    from kaika.config import PretrainConfig, from_dict, load_yaml
    from kaika.training.pretrain import read_documents

    cfg = from_dict(PretrainConfig, load_yaml(run_dir / "kaika_pretrain.yaml"))
    held_chars = sum(len(d) for d in read_documents(cfg.pretrain.val_data, cfg.pretrain.text_field))
    # Tokenizer-independent: the same total loss spread over characters instead of tokens.
    per_char = math.exp(held["loss"] * held["tokens"] / held_chars)
    row_tokens = cfg.pretrain.cutoff_len * cfg.train.batch_size
    replaced = f"; the model it replaced: {float(previous):.1f}" if previous else ""
    card = f"""# bloom-ja-tiny (kaika builtin)

A small BLOOM language model trained from scratch by `kaika pretrain` on public-domain Japanese
prose (Natsume Sōseki), with its own byte-level BPE tokenizer. It exists so that kaika's offline
quickstart instruction-tunes a model that has seen Japanese, on a laptop CPU in minutes. Not for
any real use.

| | |
|---|---|
| architecture | BLOOM (ALiBi), {config["n_layer"]} layers, hidden {config["hidden_size"]}, {config["n_head"]} heads, tied embeddings |
| parameters | {params:,} ({params / 1e6:.1f} M), stored as float16 ({(TARGET / "model.safetensors").stat().st_size / 2**20:.1f} MiB) |
| tokenizer | byte-level BPE, {config["vocab_size"]:,} tokens (`<unk>`, `<s>`, `</s>`, `<pad>` = 0–3), trained on the training text only |
| training text | {train["documents"]} works, {train["characters"]:,} characters, {train["tokens"]:,} tokens ({train["chars_per_token"]} characters per token) |
| rows | {train["cutoff_len"]} tokens, documents packed with EOS between them; attention and ALiBi positions restart per work |
| trained | {report["global_step"]} steps × {row_tokens:,} tokens = {report["tokens_seen"]:,} tokens seen (about {report["tokens_seen"] / train["tokens"]:.2f} epoch), {wall_minutes} min wall on {machine} |
| held-out perplexity | **{held["perplexity"]:.1f}** per token (loss {held["loss"]:.3f} nats, {held["tokens"]:,} tokens) — {per_char:.2f} per character ({held_chars:,} characters){replaced} |

Held out, never seen in training (tokenizer included): 『文鳥』, 『私の個人主義』, 『硝子戸の中』.

## Data and licence

The text is the cleaned Aozora Bunko Sōseki corpus (99 works; see the project's
`../shared/data/aozora_soseki/PROVENANCE.md`: ruby, annotations, legend and colophons removed).
Natsume Sōseki died in 1916: the works are in the **public domain**. The weights and tokenizer
are released under the project's licence, Apache-2.0.

## Reproduce

From a kaika checkout at commit `{commit}`, with the corpus at `../shared/data/aozora_soseki`:

```bash
python scripts/prepare_soseki.py ../shared/data/aozora_soseki runs/soseki
{command}
python scripts/ship_bloom_ja_tiny.py runs/bloom-ja-tiny {commit[:7]} "<the command>" <wall minutes>
```

`configs/pretrain/bloom-ja-tiny.yaml` holds every setting; `configs/pretrain/bloom-ja-tiny-arch.json`
the architecture. The learning rate is constant after warm-up, so the run stopped at step N is
the same model as its checkpoint N. Training on CPU in float32 is deterministic for a given
torch build and thread count; other builds give a model of the same quality, not the same bits.
"""
    (TARGET / "README.md").write_text(card, encoding="utf-8")
    print(f"shipped to {TARGET}: {params:,} parameters, held-out perplexity {held['perplexity']:.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:7])

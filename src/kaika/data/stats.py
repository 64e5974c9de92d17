"""``kaika data stats``: how long the data is, in characters and in each tokenizer's tokens.

Token counts are made the way training makes them (``kaika.data.tokenize``): the template's prompt and
the response tokenized apart, plus EOS. So "the cutoff_len that keeps 95% of examples whole" is
the cutoff_len that truncates at most 5% of them in ``kaika train``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kaika.config import DataArgs, ModelArgs
from kaika.data.records import FIELDS


class TokenLengths:
    """Token counts as training makes them: prompt and response tokenized apart, plus EOS."""

    def __init__(self, name: str, tokenizer, template):
        self.name, self.tokenizer, self.template = name, tokenizer, template

    @classmethod
    def load(cls, model: str | None, template: str, conversations: bool = False) -> TokenLengths:
        """``template`` as ``kaika train`` resolves it for this tokenizer and data."""
        from kaika.data.prompts import resolve_template
        from kaika.modeling.load import ModelSource, load_tokenizer

        name = model or ModelArgs().base_model
        path = Path(name)
        # A directory with only a tokenizer is enough here (resolve_source wants a whole model).
        source = ModelSource(name) if path.is_dir() and (path / "tokenizer_config.json").is_file() else None
        tokenizer = load_tokenizer(ModelArgs(base_model=name), source)
        return cls(name, tokenizer, resolve_template(template, tokenizer, conversations))

    def count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in enc]

    def example_lengths(self, recs: list[dict[str, str]]) -> list[tuple[int, int]]:
        """(prompt tokens, full example tokens with EOS) per record; for a conversation, the
        prompt of its last answer and the whole conversation, as training encodes them."""
        from kaika.data.conversations import training_messages
        from kaika.data.prompts import PromptTemplate
        from kaika.data.segments import segments
        from kaika.data.tokenize import leading_special_ids

        if any("messages" in r for r in recs) or not isinstance(self.template, PromptTemplate):
            out = []
            for r in recs:
                segs = segments(self.template, self.tokenizer, training_messages(r))
                total = sum(len(x.ids) for x in segs)
                out.append((total - len(segs[-1].ids), total))
            return out
        lead = len(leading_special_ids(self.tokenizer))
        prompts = self.count([self.template.format(r["instruction"], r["input"]) for r in recs])
        outputs = self.count([r["output"] for r in recs])
        return [(lead + p, lead + p + o + 1) for p, o in zip(prompts, outputs, strict=True)]


def percentiles(values: list[int], qs=(50, 90, 95, 99)) -> dict[str, int]:
    import numpy as np

    if not values:
        return {}
    arr = np.asarray(values)
    out = {f"p{q}": int(math.ceil(np.percentile(arr, q))) for q in qs}
    out["max"] = int(arr.max())
    out["mean"] = round(float(arr.mean()), 1)
    return out


def cutoff_keeping(lengths: list[int], share: float) -> int:
    """The smallest cutoff_len that keeps at least ``share`` of the examples whole."""
    if not lengths:
        return 0
    return sorted(lengths)[math.ceil(share * len(lengths)) - 1]


@dataclass
class StatsReport:
    sources: list[str]
    records: int
    with_input: int
    characters: dict[str, dict[str, int]]  # field (or turn role of conversations) -> percentiles
    tokenizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    conversations: int = 0
    turns_per_conversation: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def field_texts(recs: list[dict]) -> dict[str, list[str]]:
    """The non-empty texts of each Alpaca field and, for conversations, of each turn by role
    (``system turn``, ``user turn``, ``assistant turn``)."""
    out: dict[str, list[str]] = {f: [r[f] for r in recs if "messages" not in r and r[f]] for f in FIELDS}
    for role in ("system", "user", "assistant"):
        out[f"{role} turn"] = [
            m["content"] for r in recs if "messages" in r for m in r["messages"] if m["role"] == role
        ]
    alpaca = any("messages" not in r for r in recs)
    return {f: texts for f, texts in out.items() if texts or (f in FIELDS and alpaca)}


def data_stats(
    sources: list[str],
    models: list[str] | None = None,
    template: str = DataArgs().template,
    cutoff_len: int = DataArgs().cutoff_len,
    columns: dict[str, str] | None = None,
    plot: str | None = None,
) -> StatsReport:
    """Counts, character and token lengths per field, tokens per character, and the cutoff_len
    that keeps 95% / 99% of examples whole, for each tokenizer asked for."""
    from kaika.data.records import load_records

    recs = load_records(sources, columns or {})  # stats of valid data; `check` reports the invalid
    texts_of = field_texts(recs)
    convs = [r for r in recs if "messages" in r]
    report = StatsReport(
        list(sources),
        len(recs),
        sum(bool(r.get("input")) for r in recs),
        {f: percentiles([len(t) for t in texts]) for f, texts in texts_of.items()},
        conversations=len(convs),
        turns_per_conversation=percentiles([len(r["messages"]) for r in convs]),
    )
    lengths: dict[str, list[int]] = {}
    for model in models or [ModelArgs().base_model]:
        tok = TokenLengths.load(model, template, bool(convs))
        per_field = {}
        chars = tokens = 0
        for f, texts in texts_of.items():
            counts = tok.count(texts)
            per_field[f] = percentiles(counts)
            chars += sum(map(len, texts))
            tokens += sum(counts)
        full = [n for _, n in tok.example_lengths(recs)]
        lengths[model] = full
        report.tokenizers[model] = {
            "vocab_size": len(tok.tokenizer),
            "template": tok.template.name,
            "tokens_per_character": round(tokens / max(chars, 1), 3),
            "tokens": per_field,
            "example_tokens": percentiles(full),
            "cutoff_len_for_95": cutoff_keeping(full, 0.95),
            "cutoff_len_for_99": cutoff_keeping(full, 0.99),
            "cutoff_len": cutoff_len,
            "truncated_at_cutoff_len": sum(n > cutoff_len for n in full),
        }
    if plot:
        plot_histogram(lengths, report, cutoff_len, Path(plot))
    return report


def plot_histogram(lengths: dict[str, list[int]], report: StatsReport, cutoff_len: int, path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure  # not pyplot: no backend switched under a notebook

    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    # The long tail would squash the picture: examples beyond 1.2x the largest p99 pile up in the last bin.
    top = int(1.2 * max(max(cutoff_keeping(v, 0.99) for v in lengths.values()), cutoff_len))
    for name, values in lengths.items():
        t = report.tokenizers[name]
        ax.hist(np.minimum(values, top), bins=60, range=(0, top), alpha=0.5,
                label=f"{Path(name).name}: 95% fit in {t['cutoff_len_for_95']}, 99% in {t['cutoff_len_for_99']}")  # fmt: skip
    ax.axvline(cutoff_len, color="black", linestyle="--", label=f"cutoff_len {cutoff_len}")
    ax.set_xlabel(f"tokens per example (prompt + response + EOS); last bin: {top} and more")
    ax.set_ylabel("examples")
    ax.set_title(", ".join(Path(s).name for s in report.sources))
    ax.legend(fontsize="small")
    fig.tight_layout()
    from kaika.atomic import written_file

    suffix = Path(path).suffix.lstrip(".").lower()
    fmt = suffix if suffix in fig.canvas.get_supported_filetypes() else "png"
    with written_file(path, "--plot", binary=True) as f:
        fig.savefig(f, dpi=100, format=fmt)


def print_stats(r: StatsReport) -> None:
    share = r.with_input / max(r.records, 1)
    print(f"{r.records:,} records, {r.with_input:,} with input ({share:.0%})")
    if r.conversations:
        t = r.turns_per_conversation
        print(
            f"{r.conversations:,} of them conversations: turns p50 {t.get('p50')}, p90 {t.get('p90')}, max {t.get('max')}"
        )
    cols = ("p50", "p90", "p95", "p99", "max", "mean")
    print(f"\ncharacters   {''.join(f'{c:>8}' for c in cols)}")
    for f, p in r.characters.items():
        print(f"  {f:<15}{''.join(f'{p.get(c, 0):>8}' for c in cols)}")
    for name, t in r.tokenizers.items():
        print(
            f"\ntokens ({name}, vocab {t['vocab_size']:,}, template {t['template']}): "
            f"{t['tokens_per_character']:.2f} tokens per character"
        )
        for f, p in t["tokens"].items():
            print(f"  {f:<15}{''.join(f'{p.get(c, 0):>8}' for c in cols)}")
        e = t["example_tokens"]
        print(
            f"  {'example':<11}{''.join(f'{e.get(c, 0):>8}' for c in cols)}   (prompt template + response + EOS)"
        )
        print(
            f"  cutoff_len keeping 95% of examples whole: {t['cutoff_len_for_95']}, 99%: {t['cutoff_len_for_99']}; "
            f"at cutoff_len {t['cutoff_len']}: {t['truncated_at_cutoff_len']:,} truncated"
        )

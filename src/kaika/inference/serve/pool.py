"""The models ``kaika serve`` answers with: one base in memory, its adapters, the names requests use."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kaika.data.prompts import Template, resolve_template
from kaika.data.segments import stop_ids
from kaika.errors import KaikaError
from kaika.inference.engine import context_length
from kaika.inference.generate import load
from kaika.rundir import RunDir, base_of


@dataclass
class Entry:
    name: str
    adapter: str | None  # peft adapter name; None: the base model alone
    template: Template
    stop_ids: list[int]  # what ends an answer: EOS, and a chat template's end-of-turn token


class ModelPool:
    """One base model with its adapters (peft ``load_adapter``/``set_adapter``), and the names
    requests use to pick one. Each directory is opened by :class:`~kaika.rundir.RunDir`'s rule."""

    def __init__(
        self,
        adapters: dict[str, Path],
        base_model: str | None = None,
        base_name: str | None = None,
        dtype: str | None = None,
        template: str | None = None,
    ):
        from kaika.modeling.lora import attach_adapter

        if not adapters and not base_model:
            raise KaikaError("give at least one ADAPTER_DIR, or --base-model to serve a (merged) model alone")
        runs = {name: RunDir.open(path, base_model, dtype, template) for name, path in adapters.items()}
        if runs:
            check_same_base(adapters, base_model)
            base_run = next(iter(runs.values()))
        else:
            base_run = RunDir.open(base_model, dtype=dtype, template=template, adapter=False)
        loaded = load(base_run, base_only=True)
        self.tokenizer = loaded.tokenizer
        model = loaded.model
        self.entries: dict[str, Entry] = {}
        for i, (name, run) in enumerate(runs.items()):
            if i == 0:
                model = attach_adapter(model, run.path, base_run.model_args.base_model, adapter_name=name)
            else:
                model.load_adapter(run.path, adapter_name=name)
            self.entries[name] = Entry(name, name, run.template, stop_ids(run.template, self.tokenizer))
        self.model = model.eval()
        self.base_name = base_name or Path(base_run.model_args.base_model).name.removesuffix(".gguf")
        if self.base_name in self.entries:
            raise KaikaError(
                f"the base model's name {self.base_name!r} is also an adapter name: use --base-name"
            )
        # The base alone is prompted like the first adapter (or with its own saved template).
        default = next(iter(self.entries.values())).template if self.entries else loaded.template
        base_template = resolve_template(template, self.tokenizer) if template else default
        self.entries[self.base_name] = Entry(
            self.base_name, None, base_template, stop_ids(base_template, self.tokenizer)
        )
        self.context_length = context_length(self.model, self.tokenizer)

    @contextmanager
    def using(self, entry: Entry):
        """The model with ``entry``'s adapter active (or none); only the worker thread calls this."""
        if entry.adapter is None:
            if hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
        else:
            self.model.set_adapter(entry.adapter)
            yield self.model


def check_same_base(adapters: dict[str, Path], base_model: str | None) -> None:
    """All adapters must have been trained on one base (unless --base-model says which to use)."""
    if base_model:
        return
    bases = {name: base_of(path) for name, path in adapters.items()}
    if len(set(bases.values())) > 1:
        listing = ", ".join(f"{n}: {b}" for n, b in bases.items())
        raise KaikaError(
            f"the adapters were trained on different base models ({listing}); serve them separately, "
            "or pass --base-model if they really share one"
        )


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """``DIR`` or ``NAME=DIR`` → {name: dir}; a bare DIR is named after its directory."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if not name:
            raise KaikaError(f"adapter {spec!r}: empty name")
        if name in out:
            raise KaikaError(f"two adapters are named {name!r}: name them, e.g. {name}-2={path}")
        out[name] = Path(path)
    return out

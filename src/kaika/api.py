"""kaika from Python: the verbs of the command line as functions, for scripts and notebooks.

``import kaika`` gives them (:mod:`kaika` imports this module on first use, so ``import kaika``
stays fast). Each training verb takes a config object or a YAML path, and options by the names of
the command line's flags with underscores (``--lora-r 16`` is ``lora_r=16``, ``--data a b`` is
``data=["a", "b"]``), checked as the command line checks them. Results come back as objects; the
files are written as ``kaika`` writes them, so a run trained here is opened by the CLI and back.

    >>> import kaika
    >>> run = kaika.train(data="seed-tasks-ja", output_dir="runs/demo", max_steps=20)
    >>> model = kaika.load(run.output_dir)
    >>> model.generate("日本の首都はどこですか？").text
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaika.config import (
    DpoConfig,
    ExportOptions,
    GenerateArgs,
    MergeOptions,
    PretrainConfig,
    TrainConfig,
    config_from,
    from_dict,
)

if TYPE_CHECKING:  # the results' types, without importing torch for `import kaika`
    from kaika.inference.export import ExportResult
    from kaika.inference.generate import Generation, Loaded
    from kaika.inference.merge import MergeResult
    from kaika.training.loss import LossResult
    from kaika.training.preference import PreferenceResult
    from kaika.training.pretrain import PretrainResult
    from kaika.training.sft import TrainResult

PathLike = str | Path


def train(config: TrainConfig | PathLike | None = None, **options: Any) -> TrainResult:
    """Train a LoRA adapter, as ``kaika train`` does; returns the losses, the speed, the data report and
    the trained model (``result.model``), and writes the run to ``output_dir``.

        >>> result = kaika.train(base_model="tiny-bloom-ja", data="seed-tasks-ja", output_dir="runs/x",
        ...                      max_steps=10, lora_r=8)
        >>> result.train_loss, result.output_dir
    """
    from kaika.training.sft import train as run

    return run(config_from(TrainConfig, config, options))


def pretrain(config: PretrainConfig | PathLike | None = None, **options: Any) -> PretrainResult:
    """Continue pretraining on plain text (a LoRA adapter, or every weight with ``full=True``), as
    ``kaika pretrain`` does.

        >>> kaika.pretrain(data="soseki", output_dir="runs/pt", max_steps=10)
    """
    from kaika.training.pretrain import pretrain as run

    return run(config_from(PretrainConfig, config, options))


def dpo(config: DpoConfig | PathLike | None = None, **options: Any) -> PreferenceResult:
    """Preference tuning (DPO, IPO, ORPO, SimPO) after SFT, as ``kaika dpo`` does.

    >>> kaika.dpo(from_run="runs/sft", data="seed-prefs-ja", output_dir="runs/dpo", max_steps=10)
    """
    from kaika.training.preference import dpo as run

    return run(config_from(DpoConfig, config, options))


@dataclass
class Model:
    """A run (an adapter on its base, or a merged model) loaded once, for many generations.

        >>> model = kaika.load("runs/x")
        >>> model.generate("自己紹介してください。", max_new_tokens=64).text
        >>> [g.text for g in model.generate_batch([{"instruction": "挨拶して"}, {"instruction": "数えて"}])]

    ``model``, ``tokenizer`` and ``template`` are the loaded parts; ``base_only`` loads the base without
    the adapter (to compare)."""

    loaded: Loaded

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def template(self):
        return self.loaded.template

    def generate(
        self, instruction: str, input: str = "", *, stream: bool = False, **sampling: Any
    ) -> Generation:
        """One answer. ``sampling``: the options of ``kaika generate`` (``max_new_tokens``,
        ``temperature``, ``top_p``, ``repetition_penalty``, ``seed``…); greedy by default."""
        from kaika.inference.generate import generate

        return generate(self.loaded, instruction, input, GenerateArgs(**sampling), stream=stream)

    def generate_batch(self, records: list[dict[str, str]], **sampling: Any) -> list[Generation]:
        """Answers for ``records`` (``{"instruction": …, "input": …}``) in one batch."""
        from kaika.inference.generate import generate_batch

        rows = [{"instruction": r["instruction"], "input": r.get("input", "")} for r in records]
        return generate_batch(self.loaded, rows, GenerateArgs(**sampling))


def load(
    run: PathLike,
    *,
    base_model: str | None = None,
    base_only: bool = False,
    dtype: str | None = None,
    template: str | None = None,
) -> Model:
    """Load a run for generation: its base (checked to be the one it trained on, unless
    ``base_model`` names another), tokenizer, template and adapter, on the GPU when there is one."""
    from kaika.inference.generate import load_for_inference

    return Model(load_for_inference(run, base_model, base_only, dtype, template))


def generate(run: PathLike | Model, instruction: str, input: str = "", **sampling: Any) -> Generation:
    """One answer from a run (loaded for this call) or a :class:`Model` (loaded once, faster).

    >>> kaika.generate("runs/x", "挨拶してください。").text
    """
    model = run if isinstance(run, Model) else load(run)
    return model.generate(instruction, input, **sampling)


def evaluate(
    run: PathLike,
    tasks: PathLike = "elyza-tasks-100",
    output_dir: PathLike | None = None,
    *,
    limit: int | None = None,
    base_also: bool = True,
    base_model: str | None = None,
    judge: Any = None,
    **sampling: Any,
) -> dict[str, Any]:
    """Answer ``tasks`` with the tuned model (and its base, ``base_also``), score them against the
    references (and with an LLM judge: a :class:`kaika.eval.judge.JudgeSettings`), as ``kaika eval
    generate`` does; returns the summary (``summary["variants"]``…), and writes the answers to
    ``output_dir`` (default: ``RUN/eval/<tasks>``, as the command line).

        >>> summary = kaika.evaluate("runs/x", "seed-tasks-ja", limit=8)
    """
    from kaika.eval.answers import default_output_dir, eval_generate

    out = output_dir if output_dir is not None else default_output_dir(run, tasks)
    return eval_generate(
        run, tasks, out, GenerateArgs(**sampling), base_also=base_also, base_model=base_model, limit=limit,
        judge=judge,
    )  # fmt: skip


def eval_loss(run: PathLike, data: PathLike, **options: Any) -> dict[str, LossResult]:
    """Loss and perplexity on held-out ``data`` (instruction records), of the base and the adapter,
    as ``kaika eval loss`` does: ``{"base": LossResult, "adapter": LossResult}``.

        >>> kaika.eval_loss("runs/x", "heldout.jsonl")["adapter"].perplexity
    """
    from kaika.eval.loss import eval_loss as run_loss

    return run_loss(run, str(data), **options)


def eval_choice(
    run: PathLike, tasks: PathLike = "jcommonsenseqa", output_dir: PathLike | None = None, **options: Any
) -> dict[str, Any]:
    """Multiple-choice accuracy by log-likelihood (``jcommonsenseqa``, ``jnli`` or a file of
    ``{question, choices, answer}``), base and adapter, as ``kaika eval choice`` does (``limit``,
    ``base_also``, ``base_model``, ``dtype``); returns the summary and writes it to ``output_dir``.

        >>> kaika.eval_choice("runs/x", limit=100)["models"]["adapter"]["acc"]
    """
    from kaika.eval.answers import default_output_dir
    from kaika.eval.choice import eval_choice as run_choice

    out = output_dir if output_dir is not None else default_output_dir(run, tasks)
    return run_choice(run, str(tasks), out, **options)


def eval_suite(
    run: PathLike,
    suite: str = "ja-standard",
    output_dir: PathLike | None = None,
    *,
    judge: Any = None,
    limit: int | None = None,
    **sampling: Any,
) -> Path:
    """Every part of an evaluation suite (``ja-standard``, ``ja-quick``, ``quickstart``) with one model
    load, as ``kaika eval suite`` does; returns the HTML report's path. Parts that failed are named in
    it (and in ``suite.json``).

        >>> kaika.eval_suite("runs/x", "ja-quick")
    """
    from kaika.eval.suite import default_suite_dir
    from kaika.eval.suite import eval_suite as run_suite

    out = output_dir if output_dir is not None else default_suite_dir(run, suite)
    _, page, _ = run_suite(run, suite, out, GenerateArgs(**sampling), judge, limit=limit)
    return page


def merge(run: PathLike, out_dir: PathLike, **options: Any) -> MergeResult:
    """The adapter merged into its base, written as a Hugging Face checkpoint (safetensors) and checked
    against the unmerged model, as ``kaika merge`` does (``dtype``, ``max_shard_size``, ``force``)."""
    from kaika.inference.merge import merge as run_merge

    return run_merge(run, out_dir, **asdict(from_dict(MergeOptions, options, "merge options")))


def export(source: PathLike, out_dir: PathLike, **options: Any) -> ExportResult:
    """A run or a merged model written as GGUF for llama.cpp and Ollama (``quant``, ``ollama``,
    ``force``), read back and checked, as ``kaika export`` does."""
    from kaika.inference.export import export as run_export

    return run_export(source, out_dir, **asdict(from_dict(ExportOptions, options, "export options")))

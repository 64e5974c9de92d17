"""What a directory means to kaika: a training run, an adapter trained elsewhere, or a whole model.

Every command that takes a run opens it with :meth:`RunDir.open` (``generate``, ``chat``,
``webui``, ``serve`` and ``merge`` want an adapter; ``eval`` and ``serve --base-model`` also take a
whole model), which answers once, by one rule, which base model (and how to
load it), which tokenizer, which prompt template and which training config belong to it. The
files a run holds are named here, for the writers (:mod:`kaika.training`) and the readers alike.

The rule:

* **base model**: ``--base-model`` if given, else the run's saved config, else peft's record of
  the base in ``adapter_config.json`` (an adapter trained elsewhere); a directory that holds no
  adapter is a model by itself (a merged model, a ``kaika pretrain --full`` output, a hub id);
* **dtype**: ``--dtype`` if given, else (for an adapter) the saved config's, else ``auto``;
* **tokenizer**: the one saved in the directory (training's own, pad token included), else the
  base model's;
* **template**: ``--template`` if given, else ``template.json`` in the directory, else the saved
  config's, else kaika's default template (with a warning saying so).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from kaika.atomic import ADAPTER_CONFIG, adapter_problem, read_marker
from kaika.config import DataArgs, DpoConfig, ModelArgs, PretrainConfig, TrainConfig, load_config, save_yaml
from kaika.data.prompts import CHAT, DEFAULT, Template, load_template, resolve_template
from kaika.errors import KaikaError
from kaika.modeling.builtin import NOTICE_FILES
from kaika.modeling.load import ModelSource, load_tokenizer, resolve_source

log = logging.getLogger(__name__)

CONFIG_FILE = "kaika_config.yaml"  # kaika train: the resolved TrainConfig
PRETRAIN_CONFIG_FILE = "kaika_pretrain.yaml"  # kaika pretrain: the resolved PretrainConfig
DPO_CONFIG_FILE = "kaika_dpo.yaml"  # kaika dpo: the resolved DpoConfig
MERGED_CONFIG_FILE = "kaika_training_config.yaml"  # a merged model: the config of the run it came from
TEMPLATE_FILE = "template.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
REPORT_FILE = "data_report.json"
PRETRAIN_REPORT_FILE = "pretrain_report.json"
LOG_FILE = "trainer_log.jsonl"
CURVE_FILE = "loss_curve.png"
CHECKPOINTS = "checkpoints"
EVAL_DIR = "eval"  # kaika eval outputs kept with a run: eval/NAME/summary.json, eval/NAME.json (loss)
EVAL_SUMMARY = "summary.json"
BASE_FINGERPRINT = "base_fingerprint.json"  # the base a run was trained on: its files' sizes and hashes
# Files that mark a directory as a kaika run, so --overwrite never empties an unrelated folder.
RUN_MARKERS = (CONFIG_FILE, PRETRAIN_CONFIG_FILE, DPO_CONFIG_FILE, ADAPTER_CONFIG, CHECKPOINTS, LOG_FILE)
# Saved configs, in the order they are looked for, and the class each holds.
CONFIG_FILES: tuple[tuple[str, type], ...] = (
    (CONFIG_FILE, TrainConfig),
    (PRETRAIN_CONFIG_FILE, PretrainConfig),
    (DPO_CONFIG_FILE, DpoConfig),
    (MERGED_CONFIG_FILE, TrainConfig),
)
Config = TrainConfig | PretrainConfig | DpoConfig
DEFAULT_TEMPLATE = DEFAULT  # what a run with no saved template is prompted with

Kind = Literal["run", "adapter", "model"]


@dataclass
class RunDir:
    """A run, an adapter or a model, with the answers of the module's rule."""

    name: str  # what the user gave: a directory, a hub id or a builtin name
    kind: Kind  # run: a kaika adapter with its config; adapter: a PEFT adapter from elsewhere; model: whole
    model_args: ModelArgs  # how to load the base (for a model: the model itself)
    tokenizer_source: ModelSource
    template: Template
    config: Config | None  # as saved by the training run, if any

    @property
    def path(self) -> Path:
        return Path(self.name)

    @property
    def is_adapter(self) -> bool:
        return self.kind != "model"

    @property
    def data_args(self) -> DataArgs:
        """How the run encoded its examples (template, cutoff_len, masking); defaults if unknown."""
        if isinstance(self.config, DpoConfig):  # answers are encoded as kaika train encodes them
            return DataArgs(template=self.config.data.template, cutoff_len=self.config.data.cutoff_len)
        return self.config.data if isinstance(self.config, TrainConfig) else DataArgs()

    @property
    def source(self) -> ModelSource:
        return resolve_source(self.model_args)

    @classmethod
    def open(
        cls,
        name: str | Path,
        base_model: str | None = None,
        dtype: str | None = None,
        template: str | Path | None = None,
        *,
        adapter: bool = True,
    ) -> RunDir:
        """Open an adapter directory (a kaika run or a PEFT adapter from elsewhere) or, unless
        ``adapter`` is required, a whole model: a directory, a hub id or a builtin name.

        An adapter must be complete (a kill during its save is reported here, before any model
        loads); ``base_model`` applies to adapters only.
        """
        path = Path(name)
        config = saved_config(path)
        if adapter or (path / ADAPTER_CONFIG).exists() or is_unfinished_run(path):
            check_adapter_dir(path)
            kind: Kind = "run" if config is not None else "adapter"
            model_args = replace(config.model) if config is not None else ModelArgs(base_model=base_of(path))
            if base_model:
                model_args = replace(model_args, base_model=base_model, gguf_file=None)
            else:
                check_base_unchanged(path, model_args)
        else:
            if base_model:
                raise KaikaError(f"--base-model only applies to adapters; {name} is a whole model")
            kind = "model"
            model_args = ModelArgs(base_model=str(name))
            if config is not None:  # how the model's own run loaded it (remote code, attention)
                model_args = replace(
                    model_args,
                    trust_remote_code=config.model.trust_remote_code,
                    attention=config.model.attention,
                )
        if dtype:
            model_args = replace(model_args, dtype=dtype)
        has_tokenizer = (path / TOKENIZER_CONFIG).is_file()
        tokenizer_source = ModelSource(str(path)) if has_tokenizer else resolve_source(model_args)
        return cls(
            str(name),
            kind,
            model_args,
            tokenizer_source,
            run_template(path, config, template, tokenizer_source),
            config,
        )


def check_base_unchanged(run_dir: Path, model_args: ModelArgs) -> None:
    """The base a run will be loaded on is the one it was trained on (``base_fingerprint.json``), or
    the run is refused naming both: an adapter on other weights is another model, however well it
    loads. ``--base-model`` is the way to use another base on purpose."""
    from kaika.modeling.load import base_fingerprint, fingerprint_differences

    recorded, problem = read_marker(run_dir / BASE_FINGERPRINT)
    if problem or not recorded:  # a run from before kaika recorded it, or an adapter from elsewhere
        return
    now = base_fingerprint(resolve_source(model_args))
    if now is None:
        return
    changed = fingerprint_differences(recorded, now)
    if changed:
        raise KaikaError(
            f"{run_dir} was trained on the base model in {recorded.get('path')}, which has changed since: "
            f"{'; '.join(changed[:4])}. The adapter on these weights would be another model. Restore the base "
            f"it was trained on, or, to use this one as it is now, pass --base-model {model_args.base_model} "
            "(it must have the trained model's dimensions)"
        )


def save_base_fingerprint(source: ModelSource, out: Path) -> None:
    """Record what the base is (see :func:`check_base_unchanged`); nothing for a hub id not on disk."""
    import json

    from kaika.modeling.load import base_fingerprint

    found = base_fingerprint(source)
    if found is not None:
        (out / BASE_FINGERPRINT).write_text(json.dumps(found, indent=1) + "\n", encoding="utf-8")


def is_unfinished_run(path: Path) -> bool:
    """A training run's directory without its adapter yet (killed before saving, or still training)."""
    return path.is_dir() and is_run(path) and not (path / "config.json").is_file()


def saved_config(path: Path) -> Config | None:
    """The training config saved in ``path`` (a run, a pretraining output or a merged model), if any."""
    for file, config_cls in CONFIG_FILES:
        if (path / file).is_file():
            return load_config(config_cls, path / file)
    return None


def base_of(adapter_dir: Path) -> str:
    """The base model an adapter was trained on: its run's saved config, else peft's record."""
    config = saved_config(adapter_dir)
    if config is not None:
        return config.model.base_model
    data, problem = read_marker(adapter_dir / ADAPTER_CONFIG)
    if problem or not isinstance(data.get("base_model_name_or_path"), str):
        raise KaikaError(
            f"{adapter_dir}: cannot tell its base model ({problem or 'no base_model_name_or_path'})"
        )
    return data["base_model_name_or_path"]


def run_template(
    path: Path, config, explicit: str | Path | None = None, tokenizer_source: ModelSource | None = None
) -> Template:
    """The template of the module's rule: explicit, saved file, saved config, kaika's default.

    ``chat`` (given, or saved in a config without its template file) is the chat template of the
    run's tokenizer; a saved ``auto`` without its file is what ``auto`` means for Alpaca data."""
    if explicit:
        return named_template(str(explicit), tokenizer_source)
    if (path / TEMPLATE_FILE).is_file():
        return load_template(path / TEMPLATE_FILE)
    if isinstance(config, TrainConfig | DpoConfig):
        return named_template(config.data.template, tokenizer_source)
    log.warning(
        "%s holds no prompt template: prompting with kaika's default %s (choose another with --template)",
        path,
        DEFAULT_TEMPLATE,
    )
    return load_template(DEFAULT_TEMPLATE)


def named_template(name: str, tokenizer_source: ModelSource | None) -> Template:
    """A template saved by name (a run of an older kaika, an adapter trained elsewhere), decoded by the
    one owner of template names, :func:`kaika.data.prompts.resolve_template`."""
    tokenizer = load_tokenizer(ModelArgs(), tokenizer_source) if name == CHAT and tokenizer_source else None
    return resolve_template(name, tokenizer)


def check_adapter_dir(adapter_dir: Path) -> None:
    """Refuse a missing, incomplete or corrupt adapter with the reason, before any model is loaded."""
    if adapter_dir.is_file():
        raise KaikaError(f"{adapter_dir} is a file; give the directory of a kaika run or a PEFT adapter")
    if not adapter_dir.is_dir():
        raise KaikaError(f"adapter directory {adapter_dir} does not exist")
    if (adapter_dir / "config.json").is_file() and not (adapter_dir / ADAPTER_CONFIG).exists():
        raise KaikaError(
            f"{adapter_dir} is a whole model, not an adapter: serve it with kaika serve --base-model "
            f"{adapter_dir}, evaluate it with kaika eval, or train an adapter on it with --base-model"
        )
    problem = adapter_problem(adapter_dir)
    if problem:
        raise KaikaError(
            f"{adapter_dir} is not a complete adapter: {problem}. Was training interrupted before "
            f"saving? Its checkpoints/ can be resumed with the same kaika "
            f"{command_of(adapter_dir)} command and --resume"
        )


def command_of(run_dir: Path) -> str:
    """The kaika command that writes a run like ``run_dir``."""
    for file, command in ((PRETRAIN_CONFIG_FILE, "pretrain"), (DPO_CONFIG_FILE, "dpo")):
        if (run_dir / file).is_file():
            return command
    return "train"


# --------------------------------------------------------------------------- writing a run


def portable(cfg):
    """The config to save: a local base model path made absolute, so a run works from any directory."""
    path = Path(cfg.model.base_model).expanduser()
    if not path.exists():  # hub id or builtin name
        return cfg
    return replace(cfg, model=replace(cfg.model, base_model=str(path.resolve())))


def save_config(cfg: Config, out: Path, file: str | None = None) -> None:
    """The resolved config, under the file name readers look for (``file`` to choose another)."""
    default = {TrainConfig: CONFIG_FILE, PretrainConfig: PRETRAIN_CONFIG_FILE, DpoConfig: DPO_CONFIG_FILE}[
        type(cfg)
    ]
    save_yaml(portable(cfg), out / (file or default))


def save_template(template: Template, out: Path) -> None:
    (out / TEMPLATE_FILE).write_text(template.to_json(), encoding="utf-8")


def save_tokenizer(tokenizer, out: Path) -> None:
    """The tokenizer as generation wants it: padded on the left, so that batched rows all continue
    from their last token (kaika itself always states the side; other tools read this)."""
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)


BASE_NOTICES = "base_model"  # the base model's provenance and terms, copied into runs and merges


def save_base_notices(base_dir: str | Path, out: Path) -> list[str]:
    """Copy the base model's provenance and licence terms (when its directory has them, as the
    builtins do) into ``out/base_model/``: an adapter or a merged model carries its base's terms."""
    found = [Path(base_dir) / n for n in NOTICE_FILES if (Path(base_dir) / n).is_file()]
    if not found:
        return []
    (out / BASE_NOTICES).mkdir(exist_ok=True)
    for f in found:
        shutil.copyfile(f, out / BASE_NOTICES / f.name)
    return [f.name for f in found]


def is_run(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS)

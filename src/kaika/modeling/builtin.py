"""Builtin base models, shipped in the package or built on this machine from shipped data: no hub,
no network.

``bloom-ja-tiny`` is a small BLOOM pretrained by ``kaika pretrain --from-scratch`` on
public-domain Sōseki prose; its fp16 weights, tokenizer and provenance ship under
``kaika/assets/bloom-ja-tiny``.

``tiny-bloom-ja`` is a 4-layer BLOOM with a byte-level BPE tokenizer trained with
``tokenizers`` on public-domain Sōseki prose and the shipped Japanese seed tasks. Its weights
are random (seeded): it exists so that the whole train → adapter → generate path runs offline
in minutes. It is built once, deterministically, and cached under ``cache_dir()``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the recipe changes, so stale caches are not reused.
TINY_BLOOM_JA_VERSION = "v1"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, BLOOM's own order


def cache_dir() -> Path:
    """``$KAIKA_CACHE``, else ``$XDG_CACHE_HOME/kaika``, else ``~/.cache/kaika``."""
    if os.environ.get("KAIKA_CACHE"):
        return Path(os.environ["KAIKA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kaika"


def _tokenizer_corpus() -> Iterator[str]:
    """Shipped Japanese text: Sōseki prose, then the seed tasks and the template wording."""
    assets = resources.files("kaika.assets")
    yield from assets.joinpath("soseki_botchan_yume_juya.txt").read_text(encoding="utf-8").split("\n")
    for line in assets.joinpath("seed_tasks_ja.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        yield from (rec["instruction"], rec["input"], rec["output"])
    # The template files are read as files, not through kaika.data: modeling sits below data.
    templates = resources.files("kaika").joinpath("data", "templates")
    for name in ("alpaca_ja.json", "alpaca.json"):
        tpl = json.loads(templates.joinpath(name).read_text(encoding="utf-8"))
        yield from (tpl["prompt_input"], tpl["prompt_no_input"])


def train_tokenizer(vocab_size: int = 8192, corpus: Iterable[str] | None = None):
    """A BLOOM-style byte-level BPE tokenizer (unk/bos/eos/pad = 0/1/2/3) as a transformers tokenizer,
    trained on ``corpus`` (default: the shipped Japanese text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus() if corpus is None else corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=1024,
    )


def build_tiny_bloom_ja(out: Path) -> None:
    import torch
    from transformers import BloomConfig, BloomForCausalLM, GenerationConfig

    tokenizer = train_tokenizer()
    config = BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        n_layer=4,
        n_head=4,
        initializer_range=0.1,  # wider than BLOOM's 0.02, so a random model's LoRA has signal to learn from
        unk_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    model = BloomForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        "# tiny-bloom-ja (kaika builtin)\n\nBLOOM architecture, 4 layers, hidden 128, random weights "
        "(seed 0); byte-level BPE tokenizer (8,192 tokens) trained on public-domain Sōseki prose and the "
        "Apache-2.0 Japanese Alpaca seed tasks. Built by `kaika.modeling.builtin`; for pipeline tests, not for use.\n",
        encoding="utf-8",
    )


BUILTIN_MODELS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tiny-bloom-ja": (TINY_BLOOM_JA_VERSION, build_tiny_bloom_ja),
}

# Pretrained builtins whose weights ship inside the package (plain git, no LFS): name → folder
# under kaika/assets. bloom-ja-tiny: see its README.md there for provenance and the recipe.
SHIPPED_MODELS: dict[str, str] = {"bloom-ja-tiny": "bloom-ja-tiny"}


def shipped_model_path(name: str) -> Path:
    path = Path(str(resources.files("kaika.assets").joinpath(SHIPPED_MODELS[name])))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        from kaika.errors import KaikaError

        raise KaikaError(
            f"the builtin model {name} is missing from {path}: reinstall kaika "
            "(a git checkout must include the files under src/kaika/assets)"
        )
    return path


def builtin_model_path(name: str) -> Path:
    """The local directory of builtin ``name``: shipped in the package, or built on first use."""
    if name in SHIPPED_MODELS:
        return shipped_model_path(name)
    version, build = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / f"{name}-{version}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building builtin model %s once (cached in %s)", name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent builder (another rank) may have won
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

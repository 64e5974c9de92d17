"""examples/quickstart_ja.ipynb runs top to bottom in a real Jupyter kernel, on the tiny builtin model
(its parameters cell replaced, as papermill would), so it cannot rot."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart_ja.ipynb"
TINY = {"BASE_MODEL": '"tiny-bloom-ja"', "MAX_STEPS": "4"}


@pytest.mark.slow  # a kernel, a training run and a GGUF export: about 25 s with native bf16
def test_the_quickstart_notebook_runs_with_a_real_kernel(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    lines = params.source.splitlines()
    for name, value in TINY.items():
        (i,) = [i for i, line in enumerate(lines) if line.startswith(f"{name} = ")]
        lines[i] = f"{name} = {value}"
    params.source = "\n".join(lines)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "train loss" in text and "tokens/s" in text
    pngs = [o.data["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert pngs and base64.b64decode(pngs[0])[:8] == b"\x89PNG\r\n\x1a\n"  # the loss curve, inline
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("<progress" in h for h in html)  # transformers' notebook progress, not a terminal bar
    tables = [h for h in html if "<table" in h and "tuned" in h]  # base vs tuned answers
    assert tables and all(word in tables[0] for word in ("prompt", "base", "日本の首都"))
    assert (tmp_path / "runs" / "notebook-ja" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "exports" / "notebook-ja").glob("*.gguf"))
    assert "ollama create notebook-ja" in text

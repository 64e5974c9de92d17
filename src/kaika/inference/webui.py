"""``kaika webui``: a Gradio page to try base model + adapter: instruction, input, sampling
controls, the answer streamed as it is written. English or Japanese strings (``--lang ja``).

Gradio is imported only here (the ``webui`` extra). Its usage analytics are switched off: the
page talks to this machine only.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from kaika.config import GenerateArgs
from kaika.data.segments import record_prompt_ids
from kaika.errors import KaikaError, require_extra
from kaika.inference.engine import ContextTooLong, Stream, check_fits, context_length, run
from kaika.inference.generate import Loaded, load_for_inference
from kaika.inference.listen import check_port_free

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "title": "kaika — try the model",
        "intro": "Adapter **{adapter}** on **{base}**, prompted with the **{template}** template it was trained with.",
        "instruction": "Instruction",
        "instruction_ph": "What should the model do?",
        "input": "Input (optional)",
        "input_ph": "Context for the instruction, e.g. a text to summarise",
        "generate": "Generate",
        "stop": "Stop",
        "output": "Answer",
        "settings": "Sampling",
        "temperature": "Temperature (0 = greedy)",
        "top_p": "Top-p",
        "top_k": "Top-k (0 = no limit)",
        "max_new_tokens": "Max new tokens",
        "repetition_penalty": "Repetition penalty",
        "seed": "Seed",
        "empty": "Type an instruction first.",
        "too_long": "The prompt is too long: {n} tokens + max new tokens {m} exceed the context window of {c}.",
    },
    "ja": {
        "title": "kaika — モデルを試す",
        "intro": "ベースモデル **{base}** にアダプター **{adapter}** を適用し、学習時のテンプレート **{template}** でプロンプトを作ります。",
        "instruction": "指示",
        "instruction_ph": "モデルにしてほしいことを書いてください",
        "input": "入力（任意）",
        "input_ph": "指示に添える情報（要約する文章など）",
        "generate": "生成",
        "stop": "停止",
        "output": "応答",
        "settings": "サンプリング設定",
        "temperature": "温度（0 で貪欲法）",
        "top_p": "Top-p",
        "top_k": "Top-k（0 で制限なし）",
        "max_new_tokens": "最大生成トークン数",
        "repetition_penalty": "繰り返しペナルティ",
        "seed": "シード",
        "empty": "まず指示を入力してください。",
        "too_long": "プロンプトが長すぎます: {n} トークン + 最大生成トークン数 {m} がコンテキスト長 {c} を超えています。",
    },
}


def stream_answer(
    loaded: Loaded, instruction: str, input: str, args: GenerateArgs, cancel: threading.Event
) -> Iterator[str]:
    """The answer so far, after each new piece of text (an error of the generation is raised here,
    and Gradio shows it on the page)."""
    model, tok = loaded.model, loaded.tokenizer
    ids = record_prompt_ids(loaded.template, tok, {"instruction": instruction, "input": input})
    text = ""
    stream = Stream(
        tok,
        lambda streamer: run(
            model, tok, ids, args, streamer=streamer, cancel=cancel, stop_ids=loaded.stop_ids
        ),
        cancel=cancel,
    )
    for piece in stream:
        text += piece
        yield text


def answer_handler(loaded: Loaded, t: dict[str, str], defaults: GenerateArgs):
    """The Generate button's handler: the controls' values in, the answer so far out, streamed."""
    import gradio as gr

    context = context_length(loaded.model, loaded.tokenizer)

    def answer(instruction, input, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed):
        if not instruction.strip():
            raise gr.Error(t["empty"])
        args = dataclasses.replace(
            defaults,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            max_new_tokens=int(max_new_tokens),
            repetition_penalty=float(repetition_penalty),
            seed=int(seed),
            num_beams=1,
        )
        n = len(
            record_prompt_ids(loaded.template, loaded.tokenizer, {"instruction": instruction, "input": input})
        )
        try:
            check_fits(n, args.max_new_tokens, context)
        except ContextTooLong as e:
            raise gr.Error(t["too_long"].format(n=e.prompt_tokens, m=e.max_new_tokens, c=e.context)) from None
        cancel = threading.Event()
        try:
            yield from stream_answer(loaded, instruction, input, args, cancel)
        finally:  # Stop pressed or page closed: Gradio closes this generator
            cancel.set()

    return answer


def build_ui(loaded: Loaded, lang: str = "en", defaults: GenerateArgs | None = None, adapter_name: str = ""):
    import gradio as gr

    if lang not in LABELS:
        raise KaikaError(f"unknown language {lang!r}; available: {', '.join(LABELS)}")
    t = LABELS[lang]
    d = defaults or GenerateArgs()
    max_tokens_cap = max(d.max_new_tokens, min(context_length(loaded.model, loaded.tokenizer) or 2048, 2048))
    answer = answer_handler(loaded, t, d)
    base = Path(loaded.model_args.base_model).name
    with gr.Blocks(title=t["title"], analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {t['title']}\n\n"
            + t["intro"].format(adapter=adapter_name, base=base, template=loaded.template.name)
        )
        with gr.Row():
            with gr.Column(scale=3):
                instruction = gr.Textbox(
                    label=t["instruction"], placeholder=t["instruction_ph"], lines=3, elem_id="instruction"
                )
                input_box = gr.Textbox(label=t["input"], placeholder=t["input_ph"], lines=3, elem_id="input")
                with gr.Row():
                    generate = gr.Button(t["generate"], variant="primary", elem_id="generate")
                    stop = gr.Button(t["stop"], elem_id="stop")
                output = gr.Textbox(label=t["output"], lines=10, interactive=False, elem_id="output")
            with gr.Column(scale=2), gr.Accordion(t["settings"], open=True):
                controls = [
                    gr.Slider(0, 2, value=d.temperature, step=0.05, label=t["temperature"]),
                    gr.Slider(0.05, 1, value=d.top_p, step=0.05, label=t["top_p"]),
                    gr.Slider(0, 200, value=d.top_k, step=1, label=t["top_k"]),
                    gr.Slider(1, max_tokens_cap, value=d.max_new_tokens, step=1, label=t["max_new_tokens"]),
                    gr.Slider(1, 2, value=d.repetition_penalty, step=0.05, label=t["repetition_penalty"]),
                    gr.Number(value=d.seed, precision=0, label=t["seed"]),
                ]
        # One generation at a time: the model is shared by every visitor of the page.
        event = generate.click(answer, [instruction, input_box, *controls], output, concurrency_limit=1)
        stop.click(None, None, None, cancels=[event])
    return demo


def webui(
    adapter_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    lang: str = "en",
    base_model: str | None = None,
    dtype: str | None = None,
    template: str | None = None,
    defaults: GenerateArgs | None = None,
) -> None:
    """Load base model + adapter and serve the page until interrupted."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no calls home
    if lang not in LABELS:
        raise KaikaError(f"unknown language {lang!r}; available: {', '.join(LABELS)}")
    require_extra("webui", ("gradio",), "kaika webui")
    check_port_free(host, port, "kaika webui").close()  # said now, not after the model has loaded
    loaded = load_for_inference(adapter_dir, base_model, dtype=dtype, template=template)
    demo = build_ui(loaded, lang, defaults, Path(adapter_dir).resolve().name)
    demo.queue(max_size=16).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, show_error=True
    )

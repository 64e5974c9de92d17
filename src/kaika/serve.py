"""``kaika serve``: an OpenAI-compatible HTTP API (FastAPI on uvicorn) over one base model and
any number of LoRA adapters.

* ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
  answers as server-sent events, ending with ``data: [DONE]``), ``GET /health``.
* The request's ``model`` picks the adapter by name; the base model alone is served too, under
  its own name. All adapters sit on one base in memory (peft ``load_adapter``/``set_adapter``).
* One generation runs at a time, in a worker thread (the event loop stays free to answer, and
  switching adapters is safe); at most ``queue_size`` more wait. Any request beyond that is
  refused at once with 429, never left hanging.
* Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
* ``/v1/completions`` continues the prompt as given; ``/v1/chat/completions`` maps the messages
  onto the adapter's saved instruction template (see ``kaika.messages``).
"""

import asyncio
import json
import logging
import os
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kaika.config import CONFIG_FILE, GenerateArgs, ModelArgs, load_train_config
from kaika.engine import Result, StopFilter, context_length, run
from kaika.errors import KaikaError
from kaika.generate import Loaded, check_adapter_dir, load_for_inference
from kaika.messages import chat_prompt
from kaika.prompts import TEMPLATE_FILE, PromptTemplate, load_template
from kaika.tokenize import encode_prompt

log = logging.getLogger(__name__)

API_KEY_ENV = "KAIKA_API_KEY"


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    queue_size: int = 8  # requests that may wait while one generates; more get 429
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    context_length: int | None = None  # prompt + max_tokens bound; None: from the model
    defaults: GenerateArgs = field(default_factory=GenerateArgs)  # for what a request leaves out


@dataclass
class Entry:
    name: str
    adapter: str | None  # peft adapter name; None: the base model alone
    template: PromptTemplate


class ModelPool:
    """One base model with its adapters, and the names requests use to pick one."""

    def __init__(
        self,
        adapters: dict[str, Path],
        base_model: str | None = None,
        base_name: str | None = None,
        dtype: str | None = None,
        template: str | None = None,
    ):
        from peft import PeftModel

        if not adapters and not base_model:
            raise KaikaError("give at least one ADAPTER_DIR, or --base-model to serve a (merged) model alone")
        for path in adapters.values():
            check_adapter_dir(path)
        if adapters:
            check_same_base(adapters, base_model)
            loaded = load_for_inference(
                next(iter(adapters.values())), base_model, base_only=True, dtype=dtype
            )
        else:
            loaded = load_plain_model(base_model, dtype, template)
        base_id = loaded.model_args.base_model
        self.tokenizer = loaded.tokenizer
        model = loaded.model
        self.entries: dict[str, Entry] = {}
        for i, (name, path) in enumerate(adapters.items()):
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
            tpl = load_template(template or adapter_template(path))
            self.entries[name] = Entry(name, name, tpl)
        self.model = model.eval()
        self.base_name = base_name or Path(base_id).name.removesuffix(".gguf")
        if self.base_name in self.entries:
            raise KaikaError(
                f"the base model's name {self.base_name!r} is also an adapter name: use --base-name"
            )
        default_tpl = next(iter(self.entries.values())).template if self.entries else loaded.template
        self.entries[self.base_name] = Entry(
            self.base_name, None, load_template(template) if template else default_tpl
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


def load_plain_model(base_model: str, dtype: str | None, template: str | None) -> Loaded:
    """A model without adapter (e.g. one ``kaika merge`` wrote), with its saved template if any."""
    from kaika.models import load_model, load_tokenizer, resolve_source
    from kaika.tokenize import resolve_pad_token

    args = ModelArgs(base_model=base_model, dtype=dtype or "auto")
    source = resolve_source(args)
    tokenizer = load_tokenizer(args, source)
    resolve_pad_token(tokenizer)
    saved = Path(base_model) / TEMPLATE_FILE
    tpl = load_template(template or (saved if saved.is_file() else "alpaca_ja"))
    return Loaded(load_model(args, source), tokenizer, tpl, args)


def adapter_template(path: Path) -> str | Path:
    if (path / TEMPLATE_FILE).is_file():
        return path / TEMPLATE_FILE
    return "alpaca"  # an adapter trained elsewhere (alpaca-lora's format)


def check_same_base(adapters: dict[str, Path], base_model: str | None) -> None:
    """All adapters must have been trained on one base (unless --base-model says which to use)."""
    if base_model:
        return
    bases = {}
    for name, path in adapters.items():
        if (path / CONFIG_FILE).is_file():
            bases[name] = load_train_config(path / CONFIG_FILE).model.base_model
        else:
            bases[name] = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    if len(set(bases.values())) > 1:
        listing = ", ".join(f"{n}: {b}" for n, b in bases.items())
        raise KaikaError(
            f"the adapters were trained on different base models ({listing}); serve them separately, "
            "or pass --base-model if they really share one"
        )


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- the app


def create_app(pool: ModelPool, options: ServeOptions):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI fields kaika does not use are ignored
        model: str
        max_tokens: int | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0)  # extension (vLLM has it too)
        repetition_penalty: float | None = Field(None, gt=0)  # extension
        n: int = 1
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: dict[str, Any] | None = None

    class CompletionRequest(Sampling):
        prompt: str | list[str]

    class ChatRequest(Sampling):
        messages: list[dict[str, Any]] = Field(min_length=1)
        max_completion_tokens: int | None = None

    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kaika-generate")

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kaika", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    # Touched only on the event loop thread: no lock needed.
    state = {"admitted": 0, "completed": 0, "cancelled": 0}
    limit = options.queue_size + 1  # the one generating + the ones waiting

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
            loc = []
        else:
            message = f"{'.'.join(loc) or 'body'}: {err['msg']}"
        return JSONResponse(APIError(400, message, param=".".join(loc) or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if options.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.encode(), options.api_key.encode()
            ):
                err = APIError(
                    401, "invalid or missing API key (Authorization: Bearer …)", code="invalid_api_key"
                )
                return JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "limit": limit, **state}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in pool.entries]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        return model_card(entry_for(name).name)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "kaika"}

    def entry_for(name: str) -> Entry:
        if name not in pool.entries:
            raise APIError(
                404,
                f"the model {name!r} does not exist; available: {', '.join(pool.entries)}",
                param="model",
                code="model_not_found",
            )
        return pool.entries[name]

    def generate_args(req: Sampling, max_tokens: int | None) -> GenerateArgs:
        d = options.defaults
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if max_tokens is None:
            max_tokens = min(d.max_new_tokens, options.max_tokens_limit)
        if not 1 <= max_tokens <= options.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens must be between 1 and {options.max_tokens_limit}, got {max_tokens}",
                param="max_tokens",
            )
        return replace(
            d,
            max_new_tokens=max_tokens,
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            top_k=d.top_k if req.top_k is None else req.top_k,
            repetition_penalty=d.repetition_penalty
            if req.repetition_penalty is None
            else req.repetition_penalty,
            seed=d.seed if req.seed is None else req.seed,
            num_beams=1,
        )

    def stops(req: Sampling) -> list[str]:
        s = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(s) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        return s

    def check_length(prompt_ids: list[int], args: GenerateArgs) -> None:
        ctx = options.context_length or pool.context_length
        if ctx and len(prompt_ids) + args.max_new_tokens > ctx:
            raise APIError(
                400,
                f"this model's context window is {ctx} tokens, but the prompt has {len(prompt_ids)} and "
                f"max_tokens is {args.max_new_tokens}: shorten the prompt or lower max_tokens",
                param="prompt",
                code="context_length_exceeded",
            )

    def admit() -> None:
        if state["admitted"] >= limit:
            raise APIError(
                429,
                f"the server is busy: {limit} requests are generating or queued; retry shortly",
                type_="rate_limit_error",
                code="rate_limit_exceeded",
            )
        state["admitted"] += 1

    def submit(entry: Entry, prompt_ids, args, stop, streamer=None, cancel=None) -> asyncio.Future:
        """Queue one generation on the worker thread. Its slot is freed when the generation ends,
        not when the client leaves: a disconnected client's generation still occupies the model."""
        admit()

        def job() -> Result:
            with pool.using(entry) as model:
                return run(
                    model, pool.tokenizer, prompt_ids, args, streamer=streamer, cancel=cancel, stop=stop
                )

        def done(fut: asyncio.Future) -> None:
            state["admitted"] -= 1
            if not fut.cancelled() and fut.exception() is None:
                state["cancelled" if fut.result().finish_reason == "cancelled" else "completed"] += 1

        fut = asyncio.get_running_loop().run_in_executor(worker, job)
        fut.add_done_callback(done)
        return fut

    def usage(r: Result) -> dict[str, int]:
        return {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
        }

    def finish(r: Result) -> str:
        return "length" if r.finish_reason == "length" else "stop"

    async def respond(req: Sampling, entry: Entry, prompt_ids, args, stop, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if not req.stream:
            cancel = threading.Event()
            fut = submit(entry, prompt_ids, args, stop, cancel=cancel)
            try:
                r = await asyncio.shield(fut)
            except asyncio.CancelledError:  # the client went away: stop at the next token
                cancel.set()
                raise
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": finish(r),
                }
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": r.text, "finish_reason": finish(r), "logprobs": None}
                obj = "text_completion"
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": entry.name,
                "choices": [choice],
                "usage": usage(r),
            }

        from transformers import AsyncTextIteratorStreamer

        streamer = AsyncTextIteratorStreamer(pool.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        fut = submit(entry, prompt_ids, args, stop, streamer, cancel)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            body = {"id": rid, "object": obj, "created": created, "model": entry.name, "choices": [choice]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            filt = StopFilter(stop)
            try:
                if chat:
                    yield chunk(None, None, first=True)
                async for delta in streamer:
                    if out := filt.push(delta):
                        yield chunk(out, None)
                if out := filt.flush():
                    yield chunk(out, None)
                try:
                    r = await asyncio.shield(fut)
                except Exception as e:  # headers are sent: report in-band, as OpenAI does
                    log.exception("generation failed")
                    yield f"data: {json.dumps(APIError(500, str(e), 'server_error').body())}\n\n"
                    return
                yield chunk(None, finish(r))
                if (req.stream_options or {}).get("include_usage"):
                    body = {"id": rid, "object": obj, "created": created, "model": entry.name}
                    yield f"data: {json.dumps({**body, 'choices': [], 'usage': usage(r)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # the client went away (or we are done): stop generating

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        entry = entry_for(req.model)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of exactly one string)", param="prompt")
            prompt = prompt[0]
        args = generate_args(req, req.max_tokens)
        prompt_ids = encode_prompt(pool.tokenizer, prompt)
        check_length(prompt_ids, args)
        return await respond(req, entry, prompt_ids, args, stops(req), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        entry = entry_for(req.model)
        try:
            prompt = chat_prompt(entry.template, req.messages)
        except KaikaError as e:
            raise APIError(400, str(e), param="messages") from None
        args = generate_args(req, req.max_completion_tokens or req.max_tokens)
        prompt_ids = encode_prompt(pool.tokenizer, prompt)
        check_length(prompt_ids, args)
        return await respond(req, entry, prompt_ids, args, stops(req), chat=True)

    started = int(time.time())
    return app


# --------------------------------------------------------------------------- entry point


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


def serve(
    adapters: list[str],
    options: ServeOptions,
    base_model: str | None = None,
    base_name: str | None = None,
    dtype: str | None = None,
    template: str | None = None,
) -> None:
    """Load the models, then serve until interrupted."""
    import uvicorn

    options.api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    if options.queue_size < 0:
        raise KaikaError(f"--queue-size must be 0 or more, got {options.queue_size}")
    if options.defaults.num_beams != 1:
        raise KaikaError(
            "serve streams and samples token by token; beam search is not offered (--num-beams 1)"
        )
    pool = ModelPool(parse_adapters(adapters), base_model, base_name, dtype, template)
    app = create_app(pool, options)
    log.info(
        "serving %s on http://%s:%d/v1 (auth %s, context %s tokens, queue %d)",
        ", ".join(pool.entries),
        options.host,
        options.port,
        "on" if options.api_key else "off",
        options.context_length or pool.context_length or "unbounded",
        options.queue_size,
    )
    if options.host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        log.warning(
            "listening on %s without --api-key: anyone who can reach it can use the model", options.host
        )
    uvicorn.run(
        app,
        host=options.host,
        port=options.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )

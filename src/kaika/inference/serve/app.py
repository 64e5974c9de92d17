"""The FastAPI application of ``kaika serve``: routes, admission, generation, errors, auth.

* One generation runs at a time, on one worker thread (the event loop stays free to answer, and
  switching adapters is safe); at most ``queue_size`` more wait. Any request beyond that is
  refused at once with 429, never left hanging. A slot is freed when its generation ends, not
  when its client leaves: a disconnected client's generation still occupies the model until it
  stops at its next token.
* ``/v1/completions`` continues the prompt as given; ``/v1/chat/completions`` renders the messages
  with the adapter's saved template exactly as training encoded conversations (see
  :mod:`kaika.data.segments`); an answer ends at EOS or the template's end-of-turn token.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kaika.config import GenerateArgs, ServeOptions
from kaika.data.messages import as_messages
from kaika.data.segments import prompt_ids as conversation_ids
from kaika.data.tokenize import encode_prompt
from kaika.errors import KaikaError
from kaika.inference.engine import ContextTooLong, Result, Stream, check_fits, run
from kaika.inference.serve.pool import Entry, ModelPool
from kaika.inference.serve.schemas import (
    APIError,
    ChatRequest,
    ChunkWriter,
    CompletionRequest,
    Sampling,
    completion_body,
    finish_reason,
)

log = logging.getLogger(__name__)


class Api:
    """What the routes do, over one model pool: validate, admit, generate, answer."""

    def __init__(self, pool: ModelPool, options: ServeOptions):
        self.pool, self.options = pool, options
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kaika-generate")
        self.started = int(time.time())
        # Touched only on the event loop thread: no lock needed.
        self.counts = {"admitted": 0, "completed": 0, "cancelled": 0}
        self.limit = options.queue_size + 1  # the one generating + the ones waiting

    # request → generation --------------------------------------------------------------------

    def entry(self, name: str) -> Entry:
        if name not in self.pool.entries:
            raise APIError(
                404,
                f"the model {name!r} does not exist; available: {', '.join(self.pool.entries)}",
                param="model",
                code="model_not_found",
            )
        return self.pool.entries[name]

    def generate_args(self, req: Sampling, max_tokens: int | None) -> GenerateArgs:
        d, limit = self.options.defaults, self.options.max_tokens_limit
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if max_tokens is None:
            max_tokens = min(d.max_new_tokens, limit)
        if not 1 <= max_tokens <= limit:
            raise APIError(
                400, f"max_tokens must be between 1 and {limit}, got {max_tokens}", param="max_tokens"
            )
        given = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "repetition_penalty": req.repetition_penalty,
            "seed": req.seed,
        }
        return replace(
            d, max_new_tokens=max_tokens, num_beams=1, **{k: v for k, v in given.items() if v is not None}
        )

    def prompt_ids(self, prompt: str | list[int], args: GenerateArgs) -> list[int]:
        """Tokenized (unless given as ids) and checked against the context; blocking (call it off
        the event loop)."""
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        ids = encode_prompt(self.pool.tokenizer, prompt) if isinstance(prompt, str) else prompt
        try:
            check_fits(len(ids), args.max_new_tokens, self.options.context_length or self.pool.context_length)
        except ContextTooLong as e:
            raise APIError(
                400,
                f"this model's context window is {e.context} tokens, but the prompt has {e.prompt_tokens} "
                f"and max_tokens is {e.max_new_tokens}: shorten the prompt or lower max_tokens",
                param="prompt",
                code="context_length_exceeded",
            ) from None
        return ids

    # admission -------------------------------------------------------------------------------

    def admit(self) -> None:
        if self.counts["admitted"] >= self.limit:
            raise APIError(
                429,
                f"the server is busy: {self.limit} requests are generating or queued; retry shortly",
                type_="rate_limit_error",
                code="rate_limit_exceeded",
            )
        self.counts["admitted"] += 1

    def release(self, fut: asyncio.Future) -> None:
        self.counts["admitted"] -= 1
        if not fut.cancelled() and fut.exception() is None:
            self.counts["cancelled" if fut.result().finish_reason == "cancelled" else "completed"] += 1

    def generation(self, entry: Entry, ids, args, stop, cancel: threading.Event):
        """The blocking generation, for the worker thread; ``streamer`` is None or fed as it goes."""

        def generate(streamer=None) -> Result:
            with self.pool.using(entry) as model:
                return run(
                    model,
                    self.pool.tokenizer,
                    ids,
                    args,
                    streamer=streamer,
                    cancel=cancel,
                    stop=stop,
                    stop_ids=entry.stop_ids,
                )

        return generate

    # answers ---------------------------------------------------------------------------------

    async def answer(self, req: Sampling, entry: Entry, ids: list[int], args: GenerateArgs, chat: bool):
        rid, created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
        cancel = threading.Event()
        generate = self.generation(entry, ids, args, req.stops(), cancel)
        self.admit()
        if req.stream:
            stream = Stream(self.pool.tokenizer, generate, req.stops())
            try:
                future = stream.start(self.worker)
            except BaseException:
                self.counts["admitted"] -= 1  # never queued: its slot is free again
                raise
            future.add_done_callback(self.release)
            events = self.events(stream, ChunkWriter(rid, created, entry.name, chat), req, cancel)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        fut = asyncio.get_running_loop().run_in_executor(self.worker, generate)
        fut.add_done_callback(self.release)
        try:
            r = await asyncio.shield(fut)
        except asyncio.CancelledError:  # the client went away: stop at the next token
            cancel.set()
            raise
        return completion_body(rid, created, entry.name, r, chat)

    async def events(self, stream: Stream, out: ChunkWriter, req: Sampling, cancel: threading.Event):
        try:
            if out.chat:
                yield out.chunk(None, first=True)
            try:
                async for delta in stream.deltas():
                    yield out.chunk(delta)
            except Exception as e:  # headers are sent: report in-band, as OpenAI does
                log.exception("generation failed")
                yield out.event(APIError(500, str(e), "server_error").body())
                return
            yield out.chunk(None, finish_reason(stream.result))
            if (req.stream_options or {}).get("include_usage"):
                yield out.usage(stream.result)
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client went away (or we are done): stop generating

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "kaika"}


# --------------------------------------------------------------------------- the app


def install_errors(app: FastAPI) -> None:
    """Every error in OpenAI's shape: kaika's, request validation's and the router's own."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind and kind != "application/json":
            message = f"the request body must be JSON, sent as Content-Type: application/json (got {kind})"
            loc = []
        elif err.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
            loc = []
        else:
            message = f"{'.'.join(loc) or 'body'}: {err['msg']}"
        return JSONResponse(APIError(400, message, param=".".join(loc) or None).body(), status_code=400)

    @app.exception_handler(KaikaError)
    async def kaika_error(request: Request, exc: KaikaError):  # a value the model cannot take
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # never a plain-text 500
        log.exception("request failed")
        return JSONResponse(APIError(500, str(exc), "server_error").body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "request_too_large" if exc.status_code == 413 else None
        err = APIError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(err.body(), status_code=exc.status_code)


def install_auth(app: FastAPI, api_key: str | None) -> None:
    """With a key, every /v1 route wants ``Authorization: Bearer KEY`` (compared in constant time)."""
    if not api_key:
        return

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
                err = APIError(
                    401, "invalid or missing API key (Authorization: Bearer …)", code="invalid_api_key"
                )
                return JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


class DeclaredBodyLimit:
    """Outermost ASGI layer: a body whose Content-Length is over ``limit`` is refused before a
    byte of it is read, in OpenAI's shape. (FastAPI's ``max_body_size``, inside, answers those in
    plain text; it is what counts the bytes of a body sent without a length.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.limit:
                err = APIError(
                    413, f"the request body is larger than {self.limit} bytes", code="request_too_large"
                )
                return await JSONResponse(err.body(), status_code=413)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(pool: ModelPool, options: ServeOptions) -> DeclaredBodyLimit:
    """The ASGI app ``kaika serve`` runs: FastAPI's routes inside the body limit."""
    api = Api(pool, options)

    @asynccontextmanager
    async def lifespan(app):
        yield
        api.worker.shutdown(wait=False, cancel_futures=True)

    # max_body_size: FastAPI answers a larger body 413 (declared or counted as it arrives), before
    # pydantic ever holds it; the HTTP error handler puts that answer in OpenAI's shape.
    app = FastAPI(
        title="kaika",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
        max_body_size=options.max_body_bytes,
    )
    install_errors(app)
    install_auth(app, options.api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "limit": api.limit, **api.counts}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [api.model_card(name) for name in pool.entries]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        return api.model_card(api.entry(name).name)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        req.check_supported()
        entry = api.entry(req.model)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of exactly one string)", param="prompt")
            prompt = prompt[0]
        args = api.generate_args(req, req.max_tokens)
        # Tokenizing a long prompt takes a while: in a thread, so /health and other requests go on.
        ids = await asyncio.to_thread(api.prompt_ids, prompt, args)
        return await api.answer(req, entry, ids, args, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        req.check_supported()
        entry = api.entry(req.model)
        limit = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        args = api.generate_args(req, limit)

        def prompt_ids() -> list[int]:
            for i, m in enumerate(req.messages):
                if isinstance(m, dict) and "content" in m and m["content"] is None:
                    raise APIError(
                        400, f"messages[{i}].content is null (a tool call?): kaika serve answers text turns only",
                        param="messages",
                    )  # fmt: skip
            if all(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in req.messages):
                raise APIError(
                    400, "the conversation has only system messages: add a user message", param="messages"
                )
            try:
                messages = [{"role": m.role, "content": m.content} for m in as_messages(req.messages)]
                ids = conversation_ids(entry.template, api.pool.tokenizer, messages)
            except KaikaError as e:
                raise APIError(400, str(e), param="messages") from None
            return api.prompt_ids(ids, args)

        ids = await asyncio.to_thread(prompt_ids)
        return await api.answer(req, entry, ids, args, chat=True)

    return DeclaredBodyLimit(app, options.max_body_bytes)

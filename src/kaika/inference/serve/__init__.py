"""``kaika serve``: an OpenAI-compatible HTTP API (FastAPI on uvicorn) over one base model and
any number of LoRA adapters.

* ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
  answers as server-sent events, ending with ``data: [DONE]``), ``GET /health``.
* The request's ``model`` picks the adapter by name; the base model alone is served too, under
  its own name. All adapters sit on one base in memory.
* Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

The parts: :mod:`~kaika.inference.serve.pool` (the models), :mod:`~kaika.inference.serve.schemas`
(the wire format), :mod:`~kaika.inference.serve.app` (routes, admission, generation). FastAPI and
uvicorn (the ``serve`` extra) are imported only when :func:`serve` runs.
"""

from __future__ import annotations

import logging
import os

from kaika.config import ServeOptions, check
from kaika.errors import KaikaError, require_extra
from kaika.inference.listen import check_port_free

log = logging.getLogger(__name__)

API_KEY_ENV = "KAIKA_API_KEY"
__all__ = ["API_KEY_ENV", "ServeOptions", "serve"]  # ServeOptions is declared with the other configs


def serve(
    adapters: list[str],
    options: ServeOptions,
    base_model: str | None = None,
    base_name: str | None = None,
    dtype: str | None = None,
    template: str | None = None,
) -> None:
    """Load the models, then serve until interrupted."""
    require_extra("serve", ("fastapi", "uvicorn"), "kaika serve")
    import uvicorn

    from kaika.inference.serve.app import create_app
    from kaika.inference.serve.pool import ModelPool, parse_adapters

    options.api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    key = options.api_key
    if key is not None and (key != key.strip() or not all(33 <= ord(c) <= 126 or c == " " for c in key)):
        # HTTP header values are trimmed and ASCII: no client could ever send this key.
        raise KaikaError(
            "--api-key: no request could ever match this key (it has leading or trailing spaces, control "
            "or non-ASCII characters, which an Authorization header cannot carry); choose printable ASCII"
        )
    check(options)  # the bounds of ServeOptions again: fields may be assigned after it was built
    if options.defaults.num_beams != 1:
        raise KaikaError(
            "serve streams and samples token by token; beam search is not offered (--num-beams 1)"
        )
    # The port is taken before the models load (minutes on a large base): a busy one fails at once.
    sock = check_port_free(options.host, options.port, "kaika serve")
    try:
        pool = ModelPool(parse_adapters(adapters), base_model, base_name, dtype, template)
    except BaseException:
        sock.close()
        raise
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
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])

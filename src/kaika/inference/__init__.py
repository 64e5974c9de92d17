"""Using a trained run: generation, chat, the web page, the API server, merging.

* :mod:`~kaika.inference.generate`: :func:`load_for_inference` (a run directory, opened by
  :class:`kaika.rundir.RunDir`, loaded), :func:`generate`, batched answers;
* :mod:`~kaika.inference.engine`: one generation, streamed, with stop strings and cancellation;
* :mod:`~kaika.inference.chat`, :mod:`~kaika.inference.webui`, :mod:`~kaika.inference.serve`: the
  terminal, the browser, the OpenAI-compatible API;
* :mod:`~kaika.inference.merge`: the adapter folded into its base, verified.
"""

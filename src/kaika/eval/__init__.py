"""``kaika eval``: held-out loss, generation with Japanese-aware metrics, LLM-as-judge, run reports.

One module per subcommand: ``loss`` (``eval loss``), ``answers`` (``eval generate``), ``judge``
(``--judge``), ``report`` (``eval compare``); ``metrics`` holds the pure metric functions.
Their options are :mod:`kaika.cli.eval`'s. Nothing heavy is imported here.
"""

"""``kaika eval``: held-out loss, generation with Japanese-aware metrics, LLM-as-judge, run reports.

One module per subcommand: ``loss`` (``eval loss``), ``answers`` (``eval generate``), ``judge``
(``--judge``), ``report`` (``eval compare``); ``metrics`` holds the pure metric functions.
Nothing heavy is imported here, so ``import kaika.eval`` stays light.
"""

"""Instruction data and text, up to token ids: nothing here loads a model.

* :mod:`~kaika.data.records`: read and validate Alpaca records (JSON, JSONL, datasets); split them;
* :mod:`~kaika.data.prompts` + ``templates/*.json``: prompt templates as data;
* :mod:`~kaika.data.messages`: chat messages onto an instruction template;
* :mod:`~kaika.data.tokenize`: loss masking, EOS, padding (``pad_batch``), the data report;
* :mod:`~kaika.data.packing`: documents and examples packed into rows, block-diagonal attention;
* :mod:`~kaika.data.check`, :mod:`~kaika.data.stats`: what is wrong with data, how long it is;
* :mod:`~kaika.data.translate`: DeepL translation, cached and resumable.
"""

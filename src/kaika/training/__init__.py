"""Training: the recipes (``kaika train``, ``pretrain``, ``sweep``) over one shared training layer.

* :mod:`~kaika.training.sft`: :func:`train`, instruction tuning (LoRA);
* :mod:`~kaika.training.pretrain`: :func:`pretrain`, raw text (LoRA, full, from scratch);
* :mod:`~kaika.training.sweep`: :func:`sweep`, a grid of ``train`` runs compared;
* :mod:`~kaika.training.trainer`: the Trainer wiring the recipes share (``fit``, callbacks, sampler);
* :mod:`~kaika.training.loss`: the loss, exact and chunked, for training and scoring;
* :mod:`~kaika.training.faults`: signals, non-finite values, disks, torn checkpoints.
"""

"""The KD engine: distil (or fine-tune) a Hugging Face encoder with pykd's fused losses.

What it holds:

    config.py, options.py     the run configuration (YAML + --set), every key typed, ranged and checked at load
    corpora.py, data.py       the built-in corpora (one registry) and what a run reads: load, check, split, batch
    masking.py                data.kind mlm: BERT's masking, seeded per row
    cache.py                  the on-disk cache, file locks and atomic writes; fingerprint digests
    augment.py, teacher_cache.py   Distiller's augmentation stage; the teacher's logits computed once
    mapping.py, losses.py     layer mappings (EMD included) and the loss stages (prediction, hidden, relation, MI)
    models.py                 teachers and the students cut from them (masked LMs: heads, decoder inputs)
    mlm_head.py               `pykd mlm-head`: a masked-LM head fitted on a frozen encoder
    steps.py                  the training steps (TrainingStep: distil, fine-tune)
    kd_loss.py                the distillation objective as a loss module for any loop (pykd.KDLoss)
    trainer.py, callbacks.py  the training loop and its callbacks (train.report_to: JSONL, TensorBoard; console)
    checkpoint.py, distributed.py, optim.py, stopping.py   checkpoints, torchrun, optimiser/schedule/autocast,
                              clean stops on SIGINT/SIGTERM
    metrics.py, report.py     task metrics; the demo's report
    model_card.py             the Hub model card (README.md) of every exported model directory

What it may import: torch, transformers, datasets, scikit-learn, scipy, yaml, pykd.ops, pykd.capture, and of
pykd.nas only pykd.nas.config (the nas section of the run config) and what that section takes its choices
from; never Distiller's meta layer (pykd.distiller) or the command line.
"""

"""pykd inside other training frameworks.

    transformers.py   DistillationTrainer: transformers' Trainer distilling with pykd.KDLoss
                      (`pip install 'pykd-distill[transformers]'`)

What it may import: the KD engine (pykd.distill) and the framework it integrates with; nothing imports it
but user code.
"""

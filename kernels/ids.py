"""Ids of the relation losses, MI bounds and vocabulary-KD divergences and teachers as the kernels
receive them: the one table of them.

The ops map a name to its id here, the Triton kernels read their constants from here, and the C++
extension keeps the same table as enums (csrc/ids.h, exported as pykd._C.RELATION_LOSS_IDS,
pykd._C.MI_BOUND_IDS, pykd._C.VOCAB_DIVERGENCE_IDS and pykd._C.VOCAB_TEACHER_IDS); tests/test_ids.py
checks that all three agree name by name.
"""
RELATION_LOSS_IDS = {"kl": 0, "ce": 1, "mse_prob": 2, "mse_logit": 3}
MI_BOUND_IDS = {"infonce": 0, "nwj": 1, "tuba": 2, "js": 3, "alpha": 4}
VOCAB_DIVERGENCE_IDS = {"kl": 0, "soft_ce": 1, "reverse_kl": 2, "jsd": 3}
# Where the teacher's logits come from: its hidden states and output projection, a dense (N, V)
# tensor, or its top-k words (values and indices).
VOCAB_TEACHER_IDS = {"projected": 0, "logits": 1, "topk": 2}

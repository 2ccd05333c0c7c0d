"""Ids of the relation losses and MI bounds as the kernels receive them: the one table of them.

The ops map a name to its id here, the Triton kernels read their constants from here, and the C++
extension keeps the same table as enums (csrc/ids.h, exported as pykd._C.RELATION_LOSS_IDS and
pykd._C.MI_BOUND_IDS); tests/test_ids.py checks that all three agree name by name.
"""
RELATION_LOSS_IDS = {"kl": 0, "ce": 1, "mse_prob": 2, "mse_logit": 3}
MI_BOUND_IDS = {"infonce": 0, "nwj": 1, "tuba": 2, "js": 3, "alpha": 4}

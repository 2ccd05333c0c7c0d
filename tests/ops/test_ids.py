"""The loss and bound ids agree by name across Python (kernels/ids.py), the C++ extension and Triton."""
import pytest

from pykd._extension import cpu_extension
from pykd.kernels import ids


def test_cpp_exports_the_python_tables():
    assert dict(cpu_extension().RELATION_LOSS_IDS) == ids.RELATION_LOSS_IDS
    assert dict(cpu_extension().MI_BOUND_IDS) == ids.MI_BOUND_IDS
    assert dict(cpu_extension().VOCAB_DIVERGENCE_IDS) == ids.VOCAB_DIVERGENCE_IDS
    assert dict(cpu_extension().VOCAB_TEACHER_IDS) == ids.VOCAB_TEACHER_IDS


def test_triton_constants_match_the_table_by_name():
    kernel = pytest.importorskip("pykd.kernels.attention_relation")
    mi_kernel = pytest.importorskip("pykd.kernels.mi_bound")
    relation = {"kl": kernel.KL, "ce": kernel.CE, "mse_prob": kernel.MSE_PROB, "mse_logit": kernel.MSE_LOGIT}
    bounds = {"infonce": mi_kernel.INFONCE, "nwj": mi_kernel.NWJ, "tuba": mi_kernel.TUBA, "js": mi_kernel.JS,
              "alpha": mi_kernel.ALPHA}
    assert relation == ids.RELATION_LOSS_IDS
    assert bounds == ids.MI_BOUND_IDS



def test_vocab_kd_triton_constants_match_the_tables_by_name():
    kernel = pytest.importorskip("pykd.kernels.vocab_kd")
    divergences = {"kl": kernel.KL, "soft_ce": kernel.SOFT_CE, "reverse_kl": kernel.REVERSE_KL, "jsd": kernel.JSD}
    teachers = {"projected": kernel.PROJECTED, "logits": kernel.LOGITS, "topk": kernel.TOPK}
    assert divergences == ids.VOCAB_DIVERGENCE_IDS
    assert teachers == ids.VOCAB_TEACHER_IDS

"""Architecture search for transformer encoders: AutoDistil's SuperLM and Mixture-of-Supernets.

`Architecture`, `SubSpace` and `SearchSpace` (pykd.nas.space) describe students and their exact
costs; `SuperLM` (pykd.nas.superlm) holds one copy of the teacher's weights and runs any
sub-network of it, then exports the chosen one as a stock transformers model.
"""
from .space import Architecture, SearchSpace, SubSpace, TeacherShape
from .superlm import SuperLM, save_student

__all__ = ["Architecture", "SearchSpace", "SubSpace", "SuperLM", "TeacherShape", "save_student"]

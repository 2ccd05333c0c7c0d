"""Architecture search for transformer encoders: AutoDistil's SuperLM and Mixture-of-Supernets.

`Architecture` / `LayerwiseArchitecture`, `SubSpace` / `LayerwiseSubSpace` and `SearchSpace`
(pykd.nas.space) describe students and their exact costs; `SuperLM` (pykd.nas.superlm) holds one
copy of the teacher's weights (or, with experts > 1, routed expert copies: pykd.nas.mos) and runs
any sub-network of it, then exports the chosen one as a stock transformers model.
"""
from .space import (Architecture, LayerwiseArchitecture, LayerwiseSubSpace, SearchSpace, SubSpace, TeacherShape,
                    architecture_from_dict, parse_architecture)
from .superlm import SuperLM, save_student

__all__ = ["Architecture", "LayerwiseArchitecture", "LayerwiseSubSpace", "SearchSpace", "SubSpace", "SuperLM",
           "TeacherShape", "architecture_from_dict", "parse_architecture", "save_student"]

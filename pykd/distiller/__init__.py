"""Distiller's meta layer (arXiv 2109.11105) over the KD engine: which KD pipeline to run.

What it holds:

    pipeline.py       the pipeline vocabulary: stages, their dimensions and choices, the named pipelines of
                      the KD runs table, a pipeline as run-config values and as the recommender's numbers
    hpo.py            `pykd hpo`: an Optuna study over the pipeline's dimensions, each trial a KD run
    autodistiller.py  `pykd recommend`: meta-features of a dataset and a ratio model over past runs
    runs_table.py     `pykd runs-table`: the KD runs table those past runs make (data/kd_runs.csv ships one)

What it may import: the KD engine (pykd.distill: config, trainer, data, models, losses' choice tuples),
pykd.ops' choice tuples, optuna, scikit-learn. Nothing in pykd.distill, pykd.nas or the ops imports it.
"""

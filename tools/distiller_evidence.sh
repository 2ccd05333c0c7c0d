#!/usr/bin/env bash
# Regenerates the KD runs table, its leave-one-dataset-out regret table and Distiller's three findings
# (the packaged pykd/distiller/data/kd_runs.csv with its provenance, bench/results/kd_runs_regret.md and
# distiller_findings.md) exactly as README reports them.
# About 2 h on 2 idle cores. Rows already in the table are skipped and every run resumes, so a killed
# run picks up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
COMMON=(--finetune-steps 200 --finetune-lr 1e-4 --distill-steps 100 --distill-lr 1e-4 --batch-size 16
        --max-length 64 --teacher-train 4000 --max-eval 600 --runs runs/kd_runs --output pykd/distiller/data/kd_runs.csv --regret bench/results/kd_runs_regret.md)
BIG="layers=3,hidden=384,heads=12,ffn=1536"
SMALL="layers=2,hidden=384,heads=12,ffn=1536"
# Every pipeline on three datasets; a subset on reuters_grain, where the teacher is near the ceiling.
"$PY" tools/kd_runs_table.py "${COMMON[@]}" --datasets rotten_tomatoes,chatterbot_topics,wordnet_glosses \
    --max-train 4000 --students "$BIG"
"$PY" tools/kd_runs_table.py "${COMMON[@]}" --datasets reuters_grain --max-train 4000 --students "$BIG" \
    --pipelines default,prediction_only,hidden_mse_skip,hidden_mse_emd,mi_alpha,augment_eda
# Finding (3): a smaller training set and a smaller student, with and without augmentation.
for setting in "--max-train 500 --students $BIG" "--max-train 4000 --students $SMALL"; do
    # shellcheck disable=SC2086
    "$PY" tools/kd_runs_table.py "${COMMON[@]}" --datasets rotten_tomatoes,chatterbot_topics,reuters_grain \
        $setting --pipelines default,prediction_only,augment_eda
done
# Finding (1): a pykd hpo study over the whole pipeline (rotten_tomatoes, the table's n=4000 3x384 setting).
"$PY" -m pykd.cli hpo tools/configs/hpo_rotten_tomatoes.yaml --space tools/configs/hpo_space.yaml --trials "${TRIALS:-12}"
"$PY" tools/distiller_findings.py --table pykd/distiller/data/kd_runs.csv --study "sqlite:///runs/hpo/rotten_tomatoes/study.db@distiller-rotten-tomatoes"

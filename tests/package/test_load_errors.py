"""Every kind of file pykd reads, in a truncated, an empty and a foreign copy, ends in one pykd error naming
the file (pykd.loading.LoadError or a ValueError naming it), never a library's traceback (issue 21, section 5).

Each reader is called on the bad copy as pykd calls it; `_refused` checks the error is a ValueError (exit 2 on
the command line) whose message holds the file's path."""
import json
import pickle

import numpy as np
import pytest
import torch

from tests.paths import REPO

yaml = pytest.importorskip("yaml")
from pykd.distill import config as run_config
from pykd.loading import LoadError

FOREIGN = bytes(range(256)) * 8  # binary, not UTF-8, no format pykd reads


def _copies(whole: bytes) -> dict:
    """kind -> bytes: the truncated, empty and foreign copies of a file holding `whole`."""
    return {"truncated": whole[: len(whole) // 2], "empty": b"", "foreign": FOREIGN}


def _refused(read, path, match=None):
    with pytest.raises(ValueError) as error:
        read()
    message = str(error.value)
    assert str(path) in message, message
    assert "Traceback" not in message and "\n" not in message, message
    if match:
        assert match in message, message
    return error.value


# ---- YAML: run configs and HPO space files ----

def test_run_configs(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b'train:\n  steps: 7\n  output_dir: "runs/a-long-name\n')  # cut inside a quoted string
    assert isinstance(_refused(lambda: run_config.load(str(path)), path, "is unreadable, truncated"), LoadError)
    path.write_bytes(FOREIGN)
    _refused(lambda: run_config.load(str(path)), path, "is not UTF-8 text")
    path.write_bytes(b"\x00\x01 binary but ascii\x02")
    _refused(lambda: run_config.load(str(path)), path, "run config")
    _refused(lambda: run_config.load(str(tmp_path / "missing.yaml")), tmp_path / "missing.yaml", "does not exist")
    path.write_bytes(b"")  # empty: the defaults, as an empty mapping is
    assert run_config.load(str(path)) == run_config.DEFAULT


def test_hpo_space_files(tmp_path):
    pytest.importorskip("optuna")
    from pykd.distiller import hpo

    path = tmp_path / "space.yaml"
    whole = yaml.safe_dump({"space": {"lr": {"low": 1e-5, "high": 1e-3, "log": True}}}).encode()
    path.write_bytes(whole)
    assert [d.name for d in hpo.load_space(str(path)).dimensions] == ["lr"]
    for data in (b'space: {lr: {low: 1.0e-5, high: "1e-', FOREIGN):
        path.write_bytes(data)
        _refused(lambda: hpo.load_space(str(path)), path, "hpo space file")
    path.write_bytes(b"")
    _refused(lambda: hpo.load_space(str(path)), path, "hpo section space must be a non-empty mapping")


# ---- torch: checkpoints and SuperLM files ----

class _Code:
    def __reduce__(self):
        return print, ("code ran",)


def test_checkpoints(tmp_path):
    from pykd.distill.checkpoint import read_checkpoint, write_checkpoint

    path = tmp_path / "checkpoint.pt"
    write_checkpoint({"step": 3, "model": {"w": torch.ones(64, 64)}}, path)
    assert read_checkpoint(path)["step"] == 3
    for data in _copies(path.read_bytes()).values():
        path.write_bytes(data)
        _refused(lambda: read_checkpoint(path), path, "delete it")
    torch.save({"format": 2, "step": _Code()}, path)
    _refused(lambda: read_checkpoint(path), path, "holds objects other than tensors and plain values")


def test_superlm_files(tmp_path):
    """A missing config entry, a truncated file and a pickled object once gave raw KeyError, PytorchStreamReader
    and weights-only tracebacks. The checks come before the SuperLM is built: no teacher is needed to see them."""
    from pykd.nas.evaluate import load_supernet

    model = tmp_path / "supernet-0" / "model"
    model.mkdir(parents=True)
    path = model / "supernet.pt"
    torch.save({"config": {"layers": 2}, "state": {"w": torch.ones(64, 64)}}, path)
    whole = path.read_bytes()
    read = lambda: load_supernet(tmp_path / "supernet-0", None, None, None)  # noqa: E731
    for data in _copies(whole).values():
        path.write_bytes(data)
        _refused(read, path, "pykd nas train")
    torch.save({"state": {}}, path)
    _refused(read, path, "lacks the entries ['config'] a trained SuperLM has")
    torch.save([1, 2], path)
    _refused(read, path, "lacks the entries ['config', 'state']")
    torch.save({"config": _Code(), "state": {}}, path)
    _refused(read, path, "holds objects other than tensors and plain values")


# ---- NumPy: the teacher-logit cache ----

def test_teacher_logit_caches(tmp_path):
    from pykd.distill.teacher_cache import read_cached_logits, teacher_logits_cached  # noqa: F401

    path = tmp_path / "entry.npz"
    logits = np.arange(12, dtype=np.float32).reshape(6, 2)
    digest = __import__("hashlib").sha256(logits.tobytes()).hexdigest()
    np.savez(path, logits=logits, sha256=np.array(digest))
    assert np.array_equal(read_cached_logits(path, (6, 2)), logits)
    whole = path.read_bytes()
    for data in _copies(whole).values():
        path.write_bytes(data)
        _refused(lambda: read_cached_logits(path, (6, 2)), path, "computed again on the next run")
    np.save(tmp_path / "old.npy", logits)  # format 1, a bare .npy
    (tmp_path / "old.npy").rename(path)
    _refused(lambda: read_cached_logits(path, (6, 2)), path, "teacher-logit cache")
    path.write_bytes(whole)
    _refused(lambda: read_cached_logits(path, (7, 2)), path, "the run needs float32 of shape (7, 2)")
    nan = np.full((6, 2), np.nan, dtype=np.float32)  # the right length, filled with NaN: once used as is
    np.savez(path, logits=nan, sha256=np.array(__import__("hashlib").sha256(nan.tobytes()).hexdigest()))
    _refused(lambda: read_cached_logits(path, (6, 2)), path, "holds 12 non-finite logits")
    np.savez(path, logits=logits + 1, sha256=np.array(digest))  # altered after it was written
    _refused(lambda: read_cached_logits(path, (6, 2)), path, "does not match the checksum written with it")
    with open(path, "wb") as handle:
        pickle.dump({"logits": logits}, handle)
    _refused(lambda: read_cached_logits(path, (6, 2)), path, "teacher-logit cache")


# ---- data files ----

def test_data_files(tmp_path):
    pytest.importorskip("datasets")
    from pykd.distill import data

    def load(path):
        return data.prepare(data.load_corpus(str(path)), "classification", str(path))

    whole = b"text,label\n" + b"".join(b'"a movie, number %d",%d\n' % (i, i % 2) for i in range(20))
    for suffix, good in ((".csv", whole), (".jsonl", b"".join(json.dumps({"text": f"row {i}", "label": i % 2})
                                                                .encode() + b"\n" for i in range(20)))):
        path = tmp_path / f"data{suffix}"
        path.write_bytes(good)
        assert len(load(path).dataset) == 20
        for kind, bad in _copies(good).items():
            if kind == "truncated":
                bad = good[: good.index(b"\n", len(good) // 2) + 8]  # cut inside a row
            path.write_bytes(bad)
            _refused(lambda path=path: load(path), path)


def test_augmented_set_caches(tmp_path):
    """A cached augmented set (a datasets directory) with its files truncated, emptied or foreign."""
    datasets = pytest.importorskip("datasets")
    from pykd.distill.augment import load_augmented_set

    target = tmp_path / "augmented"
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(50)], "label": [i % 2 for i in range(50)]}) \
        .save_to_disk(str(target))
    arrow = next(target.glob("*.arrow"))
    whole = arrow.read_bytes()

    def read():
        return load_augmented_set(target)[:]

    assert len(read()["text"]) == 50
    for data in _copies(whole).values():
        arrow.write_bytes(data)
        _refused(read, target, "augmented-set cache")
    arrow.write_bytes(whole)
    (target / "state.json").unlink()
    _refused(read, target, "is unreadable, truncated or not a valid augmented-set cache")


# ---- CSV: the KD runs table ----

def test_kd_runs_tables(tmp_path):
    from pykd.distiller.autodistiller import read_table

    shipped = REPO / "bench" / "results" / "kd_runs.csv"
    if not shipped.is_file():
        pytest.skip("no KD runs table in this checkout")
    lines = shipped.read_bytes().splitlines(keepends=True)
    whole = b"".join(lines[:6])
    path = tmp_path / "kd_runs.csv"
    path.write_bytes(whole)
    assert len(read_table(str(path))) == 5
    for kind, data in _copies(whole).items():
        if kind == "truncated":
            data = b"".join(lines[:3]) + lines[3][: len(lines[3]) // 3]  # the last row cut short
        path.write_bytes(data)
        _refused(lambda: read_table(str(path)), path, "KD runs table")


# ---- Optuna: study databases and journals ----

def test_study_databases_and_journals(tmp_path):
    optuna = pytest.importorskip("optuna")
    from pykd.distiller import hpo

    database = tmp_path / "study.db"
    study = optuna.create_study(study_name="s", storage=hpo.open_storage(f"sqlite:///{database}"))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    whole = database.read_bytes()
    for data in (whole[:100], FOREIGN):  # truncated, foreign
        database.write_bytes(data)
        _refused(lambda: optuna.load_study(study_name="s", storage=hpo.open_storage(f"sqlite:///{database}")),
                 database, "cannot be opened")
    journal = tmp_path / "study.log"
    journal.write_bytes(FOREIGN + b"\n")
    _refused(lambda: hpo.open_storage(f"journal:{journal}"), journal, "cannot be opened")
    journal.write_bytes(b"")  # empty: a new journal
    assert optuna.create_study(study_name="s", storage=hpo.open_storage(f"journal:{journal}")).trials == []


# ---- model directories and training logs ----

def test_model_directories(tmp_path):
    pytest.importorskip("transformers")
    from pykd.distill.models import load_pretrained
    from tests.kd_fixtures import tiny_teacher

    directory = tmp_path / "teacher"
    tiny_teacher(tmp_path)
    weights = next(p for p in directory.iterdir() if p.name.startswith("model."))
    whole = weights.read_bytes()
    for data in _copies(whole).values():
        weights.write_bytes(data)
        _refused(lambda: load_pretrained(str(directory), "unlabeled"), directory)


def test_training_logs(tmp_path):
    from pykd.distill.callbacks import read_log

    path = tmp_path / "log.jsonl"
    whole = b"".join(json.dumps({"step": i, "loss": 1.0}).encode() + b"\n" for i in range(1, 5))
    path.write_bytes(whole[:-7])  # torn by a kill mid-write: the torn record is skipped
    assert [r["step"] for r in read_log(path, 10)] == [1, 2, 3]
    path.write_bytes(b"")
    assert read_log(path, 10) == []
    path.write_bytes(FOREIGN)
    _refused(lambda: read_log(path, 10), path, "training log")


def test_the_command_line_prints_one_line_and_exits_2(tmp_path, capsys):
    pytest.importorskip("transformers")
    from pykd.cli import main

    path = tmp_path / "run.yaml"
    path.write_bytes(b'train: {steps: 3, output_dir: "runs/cut')
    assert main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pykd distill: error: run config {path} is unreadable, truncated") and err.count("\n") == 1

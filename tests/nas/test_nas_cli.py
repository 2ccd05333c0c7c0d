"""`pykd nas train | search | export`: the chain on a tiny teacher, and bad input exiting 2."""
import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
from tests.nas.nas_fixtures import TINY_LAYERWISE, nas_values


def _cli(*args):
    """pykd.cli.main in this process (a subprocess per call would cost seconds of imports each)."""
    from pykd.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def _error_line(done) -> str:
    """The CLI's last stderr line (progress bars of model loading may precede it)."""
    return done.stderr.strip().splitlines()[-1]


def _train(tmp_path, space=None):
    path = tmp_path / "nas.yaml"
    path.write_text(json.dumps(nas_values(tmp_path, space, train={"steps": 2, "eval_every": 100, "log_every": 1,
                                                                  "checkpoint_every": 100, "progress": False})))
    done = _cli("nas", "train", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path, str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("nascli"))


@pytest.fixture(scope="module")
def trained_layerwise(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("nascli-layerwise"), TINY_LAYERWISE)


def test_train_search_export_chain(trained):
    tmp_path, config = trained
    done = _cli("nas", "search", config, "--set", "nas.search=evolution", "--set", "nas.budget.flops=0.6",
                "--set", "nas.evolution.population=6", "--set", "nas.evolution.parents=3",
                "--set", "nas.evolution.mutations=3", "--set", "nas.evolution.crossovers=3",
                "--set", "nas.evolution.generations=2")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(Path(tmp_path / "nas" / "search" / "summary.json").read_text())
    assert summary["method"] == "evolution" and "best:" in done.stdout
    output = tmp_path / "student"
    done = _cli("nas", "export", config, "--arch", summary["best"]["arch"], "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    student = transformers.AutoModel.from_pretrained(output)
    assert f"layers={student.config.num_hidden_layers},hidden={student.config.hidden_size}," in summary["best"]["arch"]
    assert (output / "tokenizer.json").exists() or (output / "vocab.txt").exists()


@pytest.mark.parametrize("args, message", [
    (["--arch", "layers=4,hidden=48,ffn_ratio=2,heads=4,depth=3"], "unknown ['depth']"),
    (["--arch", "layers=8,hidden=48,ffn_ratio=2,heads=4"], "larger than the teacher: layers 8 > the teacher's 4"),
    (["--arch", "layers=3,hidden=48,ffn_ratio=2,heads=4"], "is in none of the sub-spaces ['s']"),
    (["--arch", "layers=4,hidden=48,ffn_ratio=2,heads=4", "--set", "nas.custom_space.subspaces=[{name: s, "
      "layers: [4], hidden: [48], ffn_ratio: [2.0], heads: [4]}]"], "another configuration"),
], ids=["unknown-key", "larger-than-teacher", "outside-space", "other-space"])
def test_export_errors_exit_2_and_write_nothing(trained, args, message):
    tmp_path, config = trained
    output = tmp_path / "never"
    done = _cli("nas", "export", config, "--output", str(output), *args)
    assert done.returncode == 2 and _error_line(done).startswith("pykd nas export: error:"), done.stderr[-2000:]
    assert message in done.stderr
    assert not output.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".never")]


def test_export_to_an_existing_path_exits_2(trained):
    tmp_path, config = trained
    (tmp_path / "taken").mkdir(exist_ok=True)
    done = _cli("nas", "export", config, "--arch", "layers=2,hidden=24,ffn_ratio=1,heads=2",
                "--output", str(tmp_path / "taken"))
    assert done.returncode == 2 and "already exists" in done.stderr


def test_search_errors_exit_2(trained):
    tmp_path, config = trained
    done = _cli("nas", "search", config, "--set", "nas.budget.params=1000")
    assert done.returncode == 2 and "pykd nas search: error: no candidate meets the budget" in done.stderr
    assert "the cheapest candidate layers=2,hidden=24,ffn_ratio=1,heads=2 has" in done.stderr
    done = _cli("nas", "search", config, "--set", "nas.search=annealing")
    assert done.returncode == 2 and "nas.search must be one of ('enumerate', 'evolution', 'nsga2')" in done.stderr
    done = _cli("nas", "search", config, "--set", f"nas.output={tmp_path / 'empty'}")
    assert done.returncode == 2 and "no trained SuperLM" in done.stderr


@pytest.mark.parametrize("override, message", [
    ("nas.experts=0", "config key nas.experts must be >= 1, got 0"),
    ("nas.routing=token", "config key nas.routing must be one of ('layer', 'neuron'), got 'token'"),
    ("nas.budget.flops=-2", "config key nas.budget.flops must be finite and > 0 or null, got -2"),
    ("nas.relations=[qq,xy]", "config key nas.relations takes"),
])
def test_train_config_errors_exit_2(override, message):
    done = _cli("nas", "train", "--set", override)
    assert done.returncode == 2 and _error_line(done).startswith("pykd nas train: error:") and message in done.stderr


def test_config_shows_the_nas_section():
    done = _cli("config")
    assert done.returncode == 0
    import yaml

    nas = yaml.safe_load(done.stdout)["nas"]
    assert nas["k"] == 3 and nas["sandwich_random"] == 2 and nas["relations"] == ["qq", "kk", "vv"]
    assert nas["evolution"]["population"] == 125 and nas["search"] == "enumerate"


# ---- bad input refused before the work (issue 21, section 2 and 4) ----

@pytest.mark.parametrize("override, message", [
    ("nas.eval_batches=0", "config key nas.eval_batches must be >= 1 or null, got 0"),
    ("nas.eval_batches=-1", "config key nas.eval_batches must be >= 1 or null, got -1"),
    ("nas.proxy.lr=0", "config key nas.proxy.lr must be > 0, got 0.0"),
    ("nas.budget.flops=.inf", "config key nas.budget.flops must be finite and > 0 or null, got inf"),
    ("nas.budget.params=.nan", "config key nas.budget.params must be finite and > 0 or null, got nan"),
    ("nas.budget.latency=.inf", "config key nas.budget.latency must be finite and > 0 or null, got inf"),
    ("nas.budget.min_params=-.inf", "config key nas.budget.min_params must be finite and > 0 or null, got -inf"),
    ("nas.latency.seq_len=65", "config key nas.latency.seq_len (65) exceeds the 64 positions of the teacher"),
])
def test_search_refuses_bad_values_before_scoring(trained, override, message):
    _, config = trained
    done = _cli("nas", "search", config, "--set", override)
    assert done.returncode == 2 and _error_line(done).startswith("pykd nas search: error:"), done.stderr[-2000:]
    assert message in _error_line(done) and "[nas search]" not in done.stdout  # nothing was scored


def test_export_under_a_file_names_the_path_and_why(trained):
    tmp_path, config = trained
    (tmp_path / "a-file").write_text("not a directory")
    target = tmp_path / "a-file" / "sub" / "student"
    done = _cli("nas", "export", config, "--arch", "layers=2,hidden=24,ffn_ratio=1,heads=2", "--output", str(target))
    assert done.returncode == 2, done.stderr[-2000:]
    assert _error_line(done) == (f"pykd nas export: error: export path {str(target)!r} cannot be created: its parent "
                                 f"{str(tmp_path / 'a-file')!r} is a file, not a directory")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_directories_honour_the_umask(trained, umask):
    tmp_path, config = trained
    output = tmp_path / f"umask-{umask:o}"
    previous = os.umask(umask)
    try:
        done = _cli("nas", "export", config, "--arch", "layers=2,hidden=24,ffn_ratio=1,heads=2",
                    "--output", str(output))
    finally:
        os.umask(previous)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (output.stat().st_mode & 0o777) == 0o777 & ~umask
    files = [p for p in output.rglob("*") if p.is_file()]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}


# ---- per-layer spaces through the command line (issue 21, section 4) ----

@pytest.mark.parametrize("method", ["enumerate", "evolution"])
def test_per_layer_spaces_are_searched_and_their_candidates_written(trained_layerwise, method):
    from pykd.nas import LayerwiseArchitecture, parse_architecture

    tmp_path, config = trained_layerwise
    done = _cli("nas", "search", config, "--set", f"nas.search={method}", "--set", "nas.evolution.population=6",
                "--set", "nas.evolution.parents=3", "--set", "nas.evolution.mutations=3",
                "--set", "nas.evolution.crossovers=3", "--set", "nas.evolution.generations=2")
    assert done.returncode == 0, done.stderr[-3000:]
    directory = tmp_path / "nas" / "search"
    rows = json.loads((directory / "candidates.json").read_text())
    archs = [parse_architecture(r["arch"]) for r in rows]
    assert len(rows) == (40 if method == "enumerate" else len({r["arch"] for r in rows})) and len(rows) >= 6
    assert any(isinstance(a, LayerwiseArchitecture) and not a.is_uniform() for a in archs)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["best"]["latency"] > 0 and all(r["latency"] > 0 for r in rows if r["pareto"])


@pytest.mark.parametrize("arch, pad, outcome", [
    ("layers=2,hidden=24,heads=2/2,ffn_ratio=1/1", False, (2, 24, 2, 24)),
    ("layers=1,hidden=48,heads=4,ffn_ratio=2", False, (1, 48, 4, 96)),  # str() of a one-layer candidate
    ("layers=2,hidden=24,ffn_ratio=1,heads=2", False, (2, 24, 2, 24)),  # the uniform form of one
    ("layers=2,hidden=24,heads=2/2,ffn_ratio=1/2", True, (2, 24, 2, 48)),
    ("layers=2,hidden=24,heads=2/2,ffn_ratio=1/2", False, "different FFN widths per layer (24, 48)"),
    ("layers=2,hidden=24,heads=2/4,ffn_ratio=1/1", False, "different head counts per layer (2, 4)"),
], ids=["alike", "one-layer", "uniform-form", "padded", "ffn-differs", "heads-differ"])
def test_per_layer_architectures_export_as_far_as_a_stock_model_holds_them(trained_layerwise, arch, pad, outcome):
    tmp_path, config = trained_layerwise
    output = tmp_path / f"student-{arch.replace('/', '-')}-{pad}"
    done = _cli("nas", "export", config, "--arch", arch, "--output", str(output), *(["--pad-ffn"] if pad else []))
    if isinstance(outcome, str):
        assert done.returncode == 2 and outcome in _error_line(done) and not output.exists(), done.stderr[-2000:]
        return
    assert done.returncode == 0, done.stderr[-2000:]
    student = transformers.AutoConfig.from_pretrained(output)
    assert (student.num_hidden_layers, student.hidden_size, student.num_attention_heads,
            student.intermediate_size) == outcome


def test_the_task_proxy_on_a_per_layer_space_is_refused_when_the_config_loads(trained_layerwise):
    _, config = trained_layerwise
    done = _cli("nas", "search", config, "--set", "nas.proxy.top_k=2")
    assert done.returncode == 2 and "[nas search]" not in done.stdout
    assert _error_line(done).startswith("pykd nas search: error: config key nas.proxy.top_k fine-tunes exported "
                                        "candidates, but a per-layer space's")

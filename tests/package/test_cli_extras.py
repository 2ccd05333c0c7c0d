"""`pykd` names the extra to install whenever a KD dependency is missing, up front or at a late import."""
import re
import sys
import tomllib

import pytest

from pykd import cli
from tests.paths import REPO


def test_the_modules_checked_are_the_kd_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    distributions = {re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower()
                     for spec in project["optional-dependencies"]["kd"]}
    assert set(cli.KD_MODULES.values()) == distributions


@pytest.mark.parametrize("module", sorted(cli.KD_MODULES))
def test_a_missing_kd_module_is_named_before_any_work(module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # what importing a module that is not installed meets
    assert cli.main(["distill", "--set", "train.steps=1"]) == 2
    error = capsys.readouterr().err
    assert f"pykd distill: error: the KD engine needs `pip install 'pykd-distill[kd]'` (module '{module}' " \
           "is missing)" in error


def test_several_missing_modules_are_all_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert cli.main(["config"]) == 2
    assert "(modules 'datasets', 'tqdm' are missing)" in capsys.readouterr().err


def test_a_kd_module_failing_at_a_late_import_is_named(monkeypatch, capsys):
    """An installed but broken dependency passes the look-up and fails when imported deep inside."""
    def late_failure(mode, config):
        raise ModuleNotFoundError("No module named 'scipy.stats'", name="scipy.stats")

    monkeypatch.setattr(cli, "_train", late_failure)
    assert cli.main(["finetune"]) == 2
    assert "pykd finetune: error: the KD engine needs `pip install 'pykd-distill[kd]'` (module 'scipy' is " \
           "missing)" in capsys.readouterr().err


def test_other_missing_modules_are_not_blamed_on_the_extra(monkeypatch):
    def bug(mode, config):
        raise ModuleNotFoundError("No module named 'pykd.no_such_module'", name="pykd.no_such_module")

    monkeypatch.setattr(cli, "_train", bug)
    with pytest.raises(ModuleNotFoundError, match="pykd.no_such_module"):
        cli.main(["distill"])

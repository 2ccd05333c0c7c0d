"""tools/evidence_jobs.py: results survive a lost working tree through the archive, and a result whose
files are gone is rebuilt only when an unfinished job needs them."""
import json

import pytest
from tests.paths import load_tool

evidence_jobs = load_tool("evidence_jobs")
Job, Study = evidence_jobs.Job, evidence_jobs.Study


def two_step_plan(root, ran: list, second_wanted: bool = True):
    """'make' writes a file that 'use' reads; `ran` records which jobs ran."""
    def make():
        ran.append("make")
        (root / "made.txt").write_text("payload")
        return {"outputs": ["made.txt"]}

    def use():
        ran.append("use")
        return {"read": (root / "made.txt").read_text()}

    def plan(results):
        jobs = [Job("make", make)]
        return jobs + [Job("use", use, ["make"])] if second_wanted else jobs

    return plan


def test_a_fresh_root_takes_the_archived_results_and_runs_nothing_again(tmp_path):
    archive, ran = tmp_path / "archive", []
    first = tmp_path / "first"
    Study(first, two_step_plan(first, ran), archive).work(log=lambda _: None)
    assert ran == ["make", "use"]
    assert {p.stem for p in (archive / "done").glob("*.json")} == {"make", "use"}
    fresh, ran_again = tmp_path / "fresh", []
    study = Study(fresh, two_step_plan(fresh, ran_again), archive)
    assert set(study.results()) == {"make", "use"}  # made.txt is gone, but nothing unfinished needs it
    assert study.work(log=lambda _: None) == 0 and ran_again == []


def test_a_result_whose_outputs_are_gone_runs_again_when_an_unfinished_job_needs_them(tmp_path):
    archive, ran = tmp_path / "archive", []
    first = tmp_path / "first"
    Study(first, two_step_plan(first, ran, second_wanted=False), archive).work(log=lambda _: None)
    fresh, ran_again = tmp_path / "fresh", []
    study = Study(fresh, two_step_plan(fresh, ran_again), archive)
    assert "make" not in study.results()  # 'use' needs made.txt, which the fresh root lacks
    assert study.work(log=lambda _: None) == 2
    assert ran_again == ["make", "use"]
    assert json.loads((fresh / "done" / "use.json").read_text())["read"] == "payload"


def test_a_job_that_names_outputs_it_did_not_write_is_an_error_and_not_recorded(tmp_path):
    def plan(results):
        return [Job("liar", lambda: {"outputs": ["never_written.bin"]})]

    study = Study(tmp_path, plan)
    with pytest.raises(RuntimeError, match="liar.*never_written.bin"):
        study.work(log=lambda _: None)
    assert study.results() == {}


def test_claim_settings_refuses_a_folder_of_another_study_and_keeps_the_earliest_start(tmp_path):
    root, archive = tmp_path / "root", tmp_path / "archive"
    assert evidence_jobs.claim_settings([root, archive], {"steps": 500}, 100.0) == 100.0
    assert evidence_jobs.claim_settings([tmp_path / "new_root", archive], {"steps": 500}, 200.0) == 100.0
    with pytest.raises(ValueError, match=f"{archive}.*other settings"):
        evidence_jobs.claim_settings([tmp_path / "third", archive], {"steps": 3}, 300.0)

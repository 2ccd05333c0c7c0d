"""A resumable job graph for the evidence studies (tools/evidence_nas.py, tools/evidence_distiller.py).

A study is a set of named jobs, each with the names of the jobs it needs. A job's result is a JSON
file `<root>/done/<name>.json`, written atomically when the job finishes: a job whose file exists is
done and never runs again, so a study stopped at any point (Ctrl-C, SIGTERM, a crash, a reboot)
continues where it was when the same command runs again. Trainers inside a job resume from their
own checkpoints, so even a half-finished job loses at most one checkpoint period.

Several workers may run one study at once (`--workers N` starts N processes with one thread each,
which on this 2-core machine does ~1.2x the work of one process with two threads): a worker takes a
job by holding an exclusive, non-blocking `flock` on `<root>/locks/<name>.lock`, released by the
kernel when the worker dies, so a killed worker's job is simply taken again.

Jobs are listed by a function of the finished results (`plan(results) -> [Job]`), so jobs that
depend on an earlier outcome (the architecture a search picked) appear once that outcome exists.

Two things keep results when the working tree does not (a fresh clone, a reset checkout):
- an archive folder (committed to the repository) gets a copy of every result as it is written
  (`<archive>/done/<name>.json`, the settings in `<archive>/study.json`), and a study whose root
  lacks a result takes it from there;
- a result may name the files later jobs read from it (`"outputs"`: paths relative to the root, a
  fine-tuned teacher's directory). A result whose outputs are gone still counts as finished, unless
  an unfinished job needs it: then it runs again (its outputs are rebuilt), so a restored study never
  feeds a job a missing file, and never recomputes what nothing still needs.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    name: str
    run: Callable[[], dict]
    needs: list[str] = field(default_factory=list)
    priority: int = 0  # lower runs first among the ready jobs (long chains first)


class Study:
    def __init__(self, root: Path, plan: Callable[[dict], list[Job]], archive: Path | None = None):
        self.root = Path(root)
        self.plan = plan
        self.archive = None if archive is None else Path(archive)
        for folder in ("done", "locks", "logs"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        if self.archive is not None:
            (self.archive / "done").mkdir(parents=True, exist_ok=True)
            self._restore()

    def _restore(self) -> None:
        """Copies the archive's results that the root lacks (a fresh clone holds only the archive)."""
        for path in sorted((self.archive / "done").glob("*.json")):
            target = self.root / "done" / path.name
            if not target.exists():
                shutil.copyfile(path, target)

    def _records(self) -> dict:
        return {path.stem: json.loads(path.read_text()) for path in sorted((self.root / "done").glob("*.json"))}

    def _outputs_exist(self, record: dict) -> bool:
        return all((self.root / relative).exists() for relative in record.get("outputs", []))

    def results(self) -> dict:
        """{job name: its result} of every finished job, less those an unfinished job needs whose
        outputs are gone (those run again)."""
        records = self._records()
        while True:
            unfinished = [job for job in self.plan(records) if job.name not in records]
            stale = {need for job in unfinished for need in job.needs
                     if need in records and not self._outputs_exist(records[need])}
            if not stale:
                return records
            for name in stale:
                del records[name]

    def _write(self, path: Path, result: dict) -> None:
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(result, indent=1, default=str))
        os.replace(partial, path)

    def _finish(self, job: Job, result: dict) -> None:
        missing = [p for p in result.get("outputs", []) if not (self.root / p).exists()]
        if missing:
            raise RuntimeError(f"job {job.name} finished without its outputs {missing} under {self.root}")
        self._write(self.root / "done" / f"{job.name}.json", result)
        if self.archive is not None:
            self._write(self.archive / "done" / f"{job.name}.json", result)

    def _try_lock(self, job: Job):
        # The lock lives as long as the job runs: the caller closes the handle (the kernel does, if it dies).
        handle = open(self.root / "locks" / f"{job.name}.lock", "a")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return handle

    def pending(self) -> tuple[list[Job], list[Job]]:
        """(ready, waiting): unfinished jobs whose needs are all done, and the others."""
        results = self.results()
        jobs = [job for job in self.plan(results) if job.name not in results]
        ready = sorted((j for j in jobs if all(n in results for n in j.needs)), key=lambda j: (j.priority, j.name))
        return ready, [j for j in jobs if j not in ready]

    def work(self, log=print) -> int:
        """Runs ready jobs until none is left; returns how many this worker ran."""
        ran = 0
        while True:
            ready, waiting = self.pending()
            if not ready and not waiting:
                return ran
            taken = None
            for job in ready:
                handle = self._try_lock(job)
                if handle is None:
                    continue
                if job.name in self.results():  # finished while we looked
                    handle.close()
                    continue
                taken = (job, handle)
                break
            if taken is None:
                if not self._others_running():
                    if waiting:
                        log(f"[evidence] {len(waiting)} job(s) wait for jobs that cannot run: "
                            f"{[j.name for j in waiting][:5]}")
                    return ran
                time.sleep(20)
                continue
            job, handle = taken
            started = time.perf_counter()
            log(f"[evidence] {job.name}: started (pid {os.getpid()})")
            try:
                result = job.run()
            finally:
                handle.close()
            result = {**result, "job": job.name, "seconds": round(time.perf_counter() - started, 1)}
            self._finish(job, result)
            log(f"[evidence] {job.name}: done in {result['seconds']:.0f} s")
            ran += 1

    def _others_running(self) -> bool:
        """Some lock is held by another process (a job of another worker is in flight)."""
        for path in (self.root / "locks").glob("*.lock"):
            with open(path, "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def run_workers(argv: list[str], workers: int, root: Path, log=print) -> int:
    """Starts `workers` copies of this command (with --worker, one thread each) and waits for them.
    SIGINT/SIGTERM is passed on; each worker's trainers checkpoint and stop at a step boundary."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs = Path(root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    for index in range(workers):
        with open(logs / f"worker-{index}.log", "a") as out:  # the child keeps its own copy of the descriptor
            children.append(subprocess.Popen([sys.executable, *argv, "--worker"], env=env, stdout=out,
                                             stderr=subprocess.STDOUT))
        time.sleep(2)  # the first worker claims its job before the next one looks

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = [child.wait() for child in children]
    log(f"[evidence] workers exited with {codes}; logs in {logs}")
    return max(codes)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); nan for n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, (variance / n) ** 0.5


def claim_settings(folders: list[Path], settings: dict, started: float) -> float:
    """Writes the study's settings into each folder (root, archive) that has none; returns when the study
    started. A folder holding another study's settings is an error naming it (use another root)."""
    settings = json.loads(json.dumps(settings))
    for folder in folders:
        path = Path(folder) / "study.json"
        if path.exists():
            held = json.loads(path.read_text())
            if held["settings"] != settings:
                raise ValueError(f"{folder} holds a study with other settings ({held['settings']}); "
                                 "use another --root")
            started = min(started, held["started"])
    for folder in folders:
        path = Path(folder) / "study.json"
        Path(folder).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings, "started": started}))
    return started

"""The reproduction on a cluster (tests/reproduce_slurm.py), against a real single-node SLURM that
.ci/run starts (.ci/slurm; SLURM_CONF names it): a tiny reproduction submitted through submitit
records what the same one run in this process records, a task that SLURM requeues while it trains
(by SIGTERM, or by the time limit's USR2) resumes from its checkpoint and records what an
uninterrupted one records, a closed terminal is finished by the same command, a failed task is
named with its log while the others go on; the same through submitit's LocalExecutor; and a
machine without sbatch or submitit is told so in one line."""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

import reproduce_documents
import reproduce_plan
import reproduce_results
from conftest import refused

pytest.importorskip("submitit", reason="the reproduction's --submit needs submitit (.ci/run installs it)")
reproduce_slurm = pytest.importorskip("reproduce_slurm")

SMALL = ["--hidden-dim", "16", "--latent-dim", "4", "--alpha", "8"]  # checkpoints of kilobytes, 200 epochs of them
TINY = {"tiny-seed0": (SMALL, 1, None), "tiny-seed0-long": ([], 2, "tiny-seed0"),
        "tiny-seed1": ([*SMALL, "--seed", "1"], 1, None)}
TINY_MEASURES = {"tiny-seed0-T1": ("tiny-seed0", []), "tiny-seed0-long-T1": ("tiny-seed0-long", []),
                 "tiny-seed1-T1": ("tiny-seed1", []), "tiny-seed1-T2": ("tiny-seed1", ["--temperature", "2"])}
MEASURE_FLAGS = ["--n-eval", "20", "--n-samples", "4", "--n-importance", "4"]


def slurm_running():
    return bool(os.environ.get("SLURM_CONF")) and shutil.which("sbatch") and subprocess.run(
        ["sinfo"], capture_output=True, check=False).returncode == 0


needs_slurm = pytest.mark.skipif(not slurm_running(), reason="no SLURM here: .ci/run starts one (.ci/slurm start)")


@pytest.fixture
def reproduction(command, monkeypatch, tmp_path):
    """command (conftest) with its runs and records in tmp_path/folder: reproduction(folder, *flags)."""
    monkeypatch.setattr(reproduce_plan, "MEASURE_FLAGS", [*MEASURE_FLAGS, "--cache-dir", str(tmp_path / "cache")])
    monkeypatch.setattr(reproduce_slurm, "POLL_SECONDS", 0.5)
    monkeypatch.setattr(reproduce_documents, "write_documents", lambda records_dir, check=False: 0)

    def main(folder, *flags):
        (tmp_path / folder / "records").mkdir(parents=True, exist_ok=True)
        return command("--runs-dir", tmp_path / folder / "runs", "--records-dir", tmp_path / folder / "records",
                       *flags)
    return main


def plan(monkeypatch, trainings, measures):
    """The plan, for this process's workers and for the job array alike."""
    for part in (reproduce_results, reproduce_slurm):
        monkeypatch.setattr(part, "plan", lambda args, sections: (trainings, measures))


def records(folder):
    """{run: its record without the seconds anywhere in it, and the checkpoints' paths from the runs
    folder beside it on} of a records folder."""
    runs = str(folder.parent / "runs")

    def without_seconds(value):
        if isinstance(value, dict):
            return {key: without_seconds(v) for key, v in value.items() if key != "seconds"}
        if isinstance(value, str):
            return value.replace(runs, "RUNS")
        return [without_seconds(v) for v in value] if isinstance(value, list) else value
    return {path.stem: without_seconds(json.loads(path.read_text(encoding="utf-8")))
            for path in sorted(folder.glob("*.json"))}


def in_process_records(reproduction, tmp_path, name="reference"):
    """The plan reproduced by this process's one worker (reproduce_runs.run: real train.py and
    sample.py processes, 1 thread): the records the submitted tasks must give."""
    code, out, err = reproduction(name, "--threads", "1")
    assert code == 0, out + err
    return records(tmp_path / name / "records")


@needs_slurm
def test_a_tiny_reproduction_through_slurm_records_what_the_in_process_one_records(reproduction, monkeypatch,
                                                                                   tmp_path):
    plan(monkeypatch, TINY, TINY_MEASURES)
    code, out, err = reproduction("slurm", "--submit", "slurm", "--partition", "ci", "--cpus", "1", "--time", "10")
    assert code == 0, out + err
    assert "submitted 2 chains as job array " in out and "_TASK_0_log.out" in out  # the logs said once, up front
    assert "tasks: 0 done, " in out and "every run is recorded" in out
    submitted = json.loads((tmp_path / "slurm" / "runs" / "slurm" / "submitted.json").read_text(encoding="utf-8"))
    assert sorted(submitted) == ["tiny-seed0", "tiny-seed1"] and all(
        os.path.isfile(entry["log"]) for entry in submitted.values())
    got = records(tmp_path / "slurm" / "records")
    assert got == in_process_records(reproduction, tmp_path) and len(got) == 3  # field for field but the seconds
    # the same command again: everything recorded, nothing submitted
    code, out, _ = reproduction("slurm", "--submit", "slurm", "--partition", "ci", "--cpus", "1")
    assert code == 0 and "submitted" not in out and "every run is recorded" in out


@needs_slurm
@pytest.mark.parametrize("interrupt, said", [
    (["scontrol", "requeue"], "stopped, since the scheduler is ending this task"),  # SIGTERM, then SLURM requeues
    (["scancel", "--signal=USR2"], "Caught signal SIGUSR2"),  # the time limit's signal: submitit requeues
], ids=["scontrol-requeue", "time-limit-USR2"])
def test_a_task_requeued_while_it_trains_resumes_and_records_what_an_uninterrupted_one_records(
        reproduction, monkeypatch, tmp_path, interrupt, said):
    long = {"tiny-seed2": ([*SMALL, "--seed", "2"], 200, None)}
    plan(monkeypatch, long, {"tiny-seed2-T1": ("tiny-seed2", [])})
    checkpoints = tmp_path / "slurm" / "runs" / "tiny-seed2" / "checkpoint"
    requeued = []

    def scheduler():  # what SLURM does to a task it preempts or ends, once the task has trained a few epochs
        deadline = time.time() + 240
        while time.time() < deadline and len(list(checkpoints.glob("mix_match_*.pth"))) < 3:
            time.sleep(0.05)
        listed = tmp_path / "slurm" / "runs" / "slurm" / "submitted.json"
        job = json.loads(listed.read_text(encoding="utf-8"))["tiny-seed2"]["job"]
        requeued.append((len(list(checkpoints.glob("mix_match_*.pth"))),
                         subprocess.run([*interrupt, job], capture_output=True, text=True, check=False)))
        # SLURM holds a requeued job back for two minutes, once it is pending again; an administrator may
        # let it start at once
        def state():
            return subprocess.run(["squeue", "--noheader", "--jobs", job, "--format=%T"], capture_output=True,
                                  text=True, check=False).stdout.strip()
        while time.time() < deadline and state() != "PENDING":
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, check=False)
    interrupter = threading.Thread(target=scheduler, daemon=True)
    interrupter.start()
    code, out, err = reproduction("slurm", "--submit", "slurm", "--partition", "ci", "--cpus", "1", "--time", "10")
    interrupter.join(1)
    assert code == 0, out + err
    (epochs, result), = requeued
    assert result.returncode == 0 and 3 <= epochs < 200, result.stderr  # requeued part-way through its training
    logs = sorted((tmp_path / "slurm" / "runs" / "slurm").glob("*/*_0_log.*"))
    log = "".join(p.read_text(encoding="utf-8") for p in logs)
    assert said in log
    assert f"training tiny-seed2, from {checkpoints}/mix_match_" in log  # it came back and resumed
    assert records(tmp_path / "slurm" / "records") == in_process_records(reproduction, tmp_path)


@needs_slurm
def test_a_closed_terminal_is_finished_by_the_same_command_which_waits_for_the_queued_tasks(
        reproduction, monkeypatch, tmp_path):
    plan(monkeypatch, TINY, TINY_MEASURES)

    def close_the_terminal(seconds):  # Ctrl-C (or a closed terminal) once the tasks are in the queue
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(reproduce_slurm.time, "sleep", close_the_terminal)
        code, out, err = reproduction("slurm", "--submit", "slurm", "--partition", "ci", "--cpus", "1", "--time", "10")
    assert code == 1 and "submitted 2 chains" in out and "the submitted tasks go on in SLURM's queue; run the " \
        "same command again to wait for them and write the tables" in err, out + err
    written = []
    monkeypatch.setattr(reproduce_documents, "write_documents", lambda records_dir, check=False: written.append(1) or 0)
    code, out, err = reproduction("slurm", "--submit", "slurm", "--partition", "ci", "--cpus", "1", "--time", "10")
    assert code == 0 and "submitted" not in out, out + err
    assert re.search(r"tasks: \d done, ([1-9] running|\d running, [1-9] pending)", out), out  # it waited for them
    assert "every run is recorded" in out and written == [1] and len(records(tmp_path / "slurm" / "records")) == 3


@needs_slurm
def test_a_failed_task_is_named_with_its_log_and_the_others_go_on(reproduction, monkeypatch, tmp_path):
    trainings = {"tiny-seed0": (SMALL, 1, None), "broken-seed0": (["--alpha", "999"], 1, None)}
    plan(monkeypatch, trainings, {"tiny-seed0-T1": ("tiny-seed0", []), "broken-seed0-T1": ("broken-seed0", [])})
    code, out, err = reproduction("slurm", "--submit", "slurm", "--partition", "ci", "--cpus", "1", "--time", "10")
    assert code == 1 and "every run is recorded" not in out, out + err
    failed = [line for line in out.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and failed[0].startswith("failed: broken-seed0 (task "), out
    log = failed[0].split(", its log: ")[1]
    with open(log, encoding="utf-8") as f:
        text = f.read()
    assert "error: train.py failed (exit 2)" in text and "alpha" in text
    assert "1 tasks failed: broken-seed0; their logs are named above" in out
    assert sorted(p.name for p in (tmp_path / "slurm" / "records").iterdir()) == ["tiny-seed0.json"]  # went on


def test_the_local_executor_runs_the_same_tasks(reproduction, monkeypatch, tmp_path):
    plan(monkeypatch, TINY, TINY_MEASURES)
    code, out, err = reproduction("local", "--submit", "local", "--time", "10")
    assert code == 0, out + err
    assert "submitted 2 chains as job array " in out and "every run is recorded" in out
    assert records(tmp_path / "local" / "records") == in_process_records(reproduction, tmp_path)


def test_a_machine_without_sbatch_or_submitit_is_told_what_is_missing(reproduction, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/nonexistent")
    refused(reproduction("slurm", "--submit", "slurm"), "error: --submit slurm needs SLURM's sbatch, srun, squeue, "
            "and this machine has none of them: run the command on the cluster's login node, or use --jobs N on this "
            "machine")
    bin_dir = tmp_path / "bin"  # sbatch alone: submitit would end in a traceback at srun
    bin_dir.mkdir()
    (bin_dir / "sbatch").symlink_to(shutil.which("true", path="/bin:/usr/bin"))
    monkeypatch.setenv("PATH", str(bin_dir))
    refused(reproduction("slurm", "--submit", "slurm"), "error: --submit slurm needs SLURM's srun, squeue, and this "
            "machine has none of them")
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "reproduce_slurm")
    refused(reproduction("slurm", "--submit", "local"), "error: --submit needs submitit: pip install submitit")


def test_a_list_of_submitted_tasks_of_another_shape_is_refused_before_any_submission(reproduction, monkeypatch,
                                                                                     tmp_path):
    plan(monkeypatch, TINY, TINY_MEASURES)
    listed = tmp_path / "local" / "runs" / "slurm" / "submitted.json"
    for content in ('[["tiny-seed0", "12_0"]]', '{"tiny-seed0": "12_0"}'):  # another version's, edited by hand
        listed.parent.mkdir(parents=True, exist_ok=True)
        listed.write_text(content, encoding="utf-8")
        refused(reproduction("local", "--submit", "local", "--time", "10"), f"error: {listed} is not this command's "
                "list of the tasks it submitted", "restore it")
        assert listed.read_text(encoding="utf-8") == content
        assert not (tmp_path / "local" / "runs" / "tiny-seed0").exists()  # nothing trained


@needs_slurm
def test_a_job_array_the_scheduler_refuses_is_one_line_with_its_reason(reproduction, monkeypatch, tmp_path):
    plan(monkeypatch, TINY, TINY_MEASURES)
    code, out, err = reproduction("slurm", "--submit", "slurm", "--partition", "no-such-partition")
    refused((code, out, err), "error: SLURM refused the job array (", "artition", "nothing more was submitted")
    assert "Traceback" not in err


def test_a_file_where_the_tasks_logs_go_is_named_before_any_submission(reproduction, monkeypatch, tmp_path):
    plan(monkeypatch, TINY, TINY_MEASURES)
    (tmp_path / "local" / "runs").mkdir(parents=True)
    (tmp_path / "local" / "runs" / "slurm").write_text("", encoding="utf-8")  # the folder --runs-dir implies
    logs = tmp_path / "local" / "runs" / "slurm"
    refused(reproduction("local", "--submit", "local", "--time", "10"), f"error: {logs}: a folder stands where a file "
            "belongs, or a file where a folder belongs", "the tasks' logs")
    assert not (tmp_path / "local" / "runs" / "tiny-seed0").exists()  # nothing trained

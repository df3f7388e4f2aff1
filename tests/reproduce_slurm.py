"""
The reproduction on a cluster (`tests/reproduce_results.py --submit slurm`; not a test): the plan's
chains go to SLURM as one job array through submitit, each task one chain (a run and the runs that
continue it), trained, measured and recorded exactly as a worker of `--jobs` does it
(reproduce_runs.do_chain).

- A task that SLURM brings to its time limit or preempts with USR2 (submitit's --signal) has its
  script ended (its files are each whole) and is requeued through submitit's checkpointing; one
  that SLURM requeues or preempts with SIGTERM stops train.py between whole files and waits for
  its end. Requeued, a task resumes its training from the newest checkpoint (train.py --resume),
  so it records what an uninterrupted task records.
- A task that fails is named in one line with its log; the others go on.
- The command waits, printing the tasks done, running, pending and failed, then plans again
  (section "fixes" picks its later runs from earlier ones' measurements), submits what is new,
  and writes the tables once every task has ended. Run again (a closed terminal, a failed task
  fixed), it submits only what is neither recorded nor still in the queue: the tasks it submitted
  are listed in RUNS_DIR/slurm/submitted.json.

`--submit local` runs the same tasks through submitit's LocalExecutor, each chain a process of this
machine at once (a check of the submission without a cluster; --jobs shares one machine better).
"""
import argparse
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import submitit

import reproduce_documents
from reproduce_plan import REPO, chain_measures, chains, plan, read_json_file, recorded
from reproduce_runs import STOPPING, do_chain, format_seconds, stop_scripts
from utils import save_json

POLL_SECONDS = 10  # how often the command looks at the queue


class ChainTask(submitit.helpers.Checkpointable):
    """One task of the array: one chain, as a local worker does it, with the plan's flags whole."""

    def __init__(self, args, chain, trainings, measures):
        self.args, self.chain, self.trainings, self.measures = args, chain, trainings, measures

    def __call__(self):
        # SIGTERM (scontrol requeue, a preemption, scancel) reaches every process of the task: the
        # script stops between whole files, and its stop is no failure (reproduce_runs.run)
        signal.signal(signal.SIGTERM, lambda signum, frame: STOPPING.set())
        do_chain(self.args, self.chain, self.trainings, self.measures)
        return self.chain

    def checkpoint(self, *args, **kwargs):
        """USR2, the time limit's or a preemption's signal: end the script (its files are whole), then
        let submitit requeue this same task, which resumes from the newest checkpoint."""
        stop_scripts()
        return super().checkpoint(*args, **kwargs)


def submit(args, sections):
    """Submit, wait for and finish the reproduction on args.submit ("slurm" or "local"); returns the
    exit code: 0 once every run is recorded and the tables are written, 1 naming the failed tasks."""
    missing = [command for command in ("sbatch", "srun", "squeue") if not shutil.which(command)]
    if args.submit == "slurm" and missing:  # submitit submits with sbatch and runs each task with srun
        sys.exit(f"error: --submit slurm needs SLURM's {', '.join(missing)}, and this machine has "
                 f"{'none of them' if len(missing) > 1 else 'none'}: run the command on the cluster's login node, or "
                 f"use --jobs N on this machine")
    folder = os.path.join(args.runs_dir, "slurm")
    # a task imports this file, the scripts' utils and the reproduction's parts, as this command does
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO, os.path.dirname(os.path.abspath(__file__)),
                                                *filter(None, [os.environ.get("PYTHONPATH")])])
    executor = submitit.AutoExecutor(folder=os.path.join(folder, "%A"), cluster=args.submit)
    executor.update_parameters(name="reproduce", timeout_min=args.time, cpus_per_task=args.cpus,
                               gpus_per_node=args.gpus, **({"slurm_partition": args.partition}
                                                           if args.partition and args.submit == "slurm" else {}))
    task_args = argparse.Namespace(**{**vars(args), "threads": args.cpus})
    try:
        return wait_and_finish(args, sections, executor, task_args, folder)
    except KeyboardInterrupt:
        sys.exit("interrupted: the submitted tasks go on in SLURM's queue; run the same command again to wait for "
                 "them and write the tables" if args.submit == "slurm" else
                 "interrupted, with this machine's tasks: run the same command again to continue")


def wait_and_finish(args, sections, executor, task_args, folder):
    """Submit what the plan leaves, round after round, wait for it, then write the tables."""
    listed = os.path.join(folder, "submitted.json")
    submitted = read_submitted(listed)  # {first run of a chain: {"job": "1234_5", "log": path}}
    jobs, failed, t0, last = {}, set(), time.time(), None
    while True:
        trainings, measures = plan(args, sections)
        planned = chains(trainings, measures)
        todo = [chain for chain in planned if not all(recorded(args, r) for r in chain)]
        states = queue_states(args, {chain[0]: submitted.get(chain[0]) for chain in todo}, jobs)
        new = [chain for chain in todo if states[chain[0]] == "ended" and chain[0] not in failed
               and chain[0] not in jobs]
        for chain in [chain for chain in todo if states[chain[0]] == "ended" and chain[0] in jobs]:
            failed.add(chain[0])  # ended without its records
            jobs.pop(chain[0])
            print(f"failed: {chain[0]} (task {submitted[chain[0]]['job']}), its log: {submitted[chain[0]]['log']}",
                  flush=True)
        waiting = [name for name, state in states.items() if state != "ended"]
        if new and not waiting:  # every task of the plan so far has ended: submit what is left, in one array
            os.makedirs(folder, exist_ok=True)
            try:  # submitit prints sbatch's complaint as well as raising it: the reason is said once, below
                with contextlib.redirect_stderr(io.StringIO()), executor.batch():
                    batch = [(chain, executor.submit(ChainTask(task_args, chain, trainings,
                                                               chain_measures(chain, measures)))) for chain in new]
            except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
                reason = ([line for line in str(e).splitlines() if line.strip()] or ["it gave no reason"])[-1]
                sys.exit(f"error: SLURM refused the job array ({reason.strip()}); nothing more was submitted. Fix "
                         f"the cause (--partition, --gpus, --cpus, --time, or the cluster), then run the same command "
                         f"again")
            for chain, job in batch:
                jobs[chain[0]] = job
                submitted[chain[0]] = {"job": job.job_id, "log": str(job.paths.stderr)}
            save_json(submitted, listed, indent=1)
            array = batch[0][1].job_id.split("_")[0]
            print(f"submitted {len(batch)} chains as job array {array} ({args.cpus} CPUs"
                  f"{f', {args.gpus} GPUs' if args.gpus else ''} and {args.time} minutes per task): each task's "
                  f"log is {os.path.join(folder, array, f'{array}_TASK_0_log.out')} (and .err), each run's own "
                  f"under {args.runs_dir}/RUN/", flush=True)
            continue
        if not waiting:
            break
        counts = {state: sum(s == state for s in states.values()) for state in ("running", "pending")}
        line = (f"tasks: {len(planned) - len(todo)} done, {counts['running']} running, "
                f"{counts['pending']} pending, {len(failed)} failed ({format_seconds(time.time() - t0)} so far)")
        if line.split(" (")[0] != last:
            print(line, flush=True)
            last = line.split(" (")[0]
        time.sleep(POLL_SECONDS)
    if failed:
        print(f"{len(failed)} tasks failed: {', '.join(sorted(failed))}; their logs are named above. Fix the cause "
              f"and run this command again: it submits only what is not recorded")
        return 1
    print(f"every run is recorded ({format_seconds(time.time() - t0)})")
    return reproduce_documents.write_documents(args.records_dir)


def read_submitted(path):
    """The tasks this command listed as submitted ({first run of a chain: {"job": id, "log": path}}),
    {} where it has listed none; a list it cannot read, or of another shape (edited by hand, of
    another version), ends the command in one line: guessed, tasks still queued would be
    submitted twice."""
    if not os.path.exists(path):
        return {}
    submitted = read_json_file(path)
    if not isinstance(submitted, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("job"), str) and isinstance(entry.get("log"), str)
            for entry in submitted.values()):
        sys.exit(f"error: {path} is not this command's list of the tasks it submitted ({{run: {{\"job\": ID, "
                 f"\"log\": PATH}}}}): restore it; or, once no task of this reproduction is in SLURM's queue "
                 f"(squeue --me), delete it, and run the same command again")
    return submitted


def queue_states(args, listed, jobs):
    """{first run of a chain: "pending", "running" or "ended"} of each chain's task: on SLURM as its
    queue shows them (this command's and an earlier one's, listed), on this machine by submitit."""
    states = {name: "ended" for name in listed}
    if args.submit != "slurm":
        for name, job in jobs.items():
            if name in states and not job.done():
                states[name] = "running" if job.state == "RUNNING" else "pending"
        return states
    tasks = {entry["job"]: name for name, entry in listed.items() if entry}
    if tasks:
        result = subprocess.run(["squeue", "--noheader", "--array", "--format=%i %T", "--jobs",
                                 ",".join(sorted({task.split("_")[0] for task in tasks}))],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0 and "Invalid job id" not in result.stderr:  # the queue did not answer: ask again
            return {name: "pending" if entry else "ended" for name, entry in listed.items()}
        for line in result.stdout.splitlines():
            task, state = line.split()
            if task in tasks:
                states[tasks[task]] = "running" if state in ("RUNNING", "COMPLETING") else "pending"
    return states

"""
One chain of the reproduction's runs, trained, measured and recorded (tests/reproduce_results.py;
not a test): what a worker of `--jobs` and a task of `--submit` both do (do_chain). Each run is
train.py, then sample.py --metrics --json for each of its measurements, each script a process of
its own with the run's threads; then its record, from its final checkpoint and its measurements'
JSONs. A script ended by SIGTERM (this command's, or the scheduler's) stops between whole files.
"""
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import torch
from filelock import FileLock, Timeout

from one_side_random import SIDES
from reproduce_plan import (
    RECORDS,
    REPO,
    SHIPPED,
    metrics_json,
    read_json_file,
    recorded,
)
from utils import (
    save_json,
)

# the seed-0 completion grids of the report, copied into samples/ as each is measured:
# {measurement: file under samples/}
GRIDS = {"shipped-T1": "sampled.png", "fixed-seed0-T1": "sampled_fixed.png",
         "curriculum-seed0-T1": "sampled_curriculum.png",
         **{f"{prefix}{mode}-seed0-T1": f"sampled_{prefix[:-1]}_{mode}.png" for prefix in ("ar-", "rnn-")
            for mode in ("mix-and-match", "fixed", "concat")}}


def do_chain(args, chain, trainings, measures, after_each=None):
    """Train, measure and record each run of a chain that is not recorded yet, holding the chain's
    lock (a chain another worker or process holds is left to it; the system releases the lock of a
    process that ended, so a task that SLURM requeues takes its chain again, on any node that shares
    the folder); measures: the chain's measurements, {name: (run, sample.py flags)}, chain_measures.
    after_each() runs after each record."""
    os.makedirs(args.runs_dir, exist_ok=True)
    try:
        lock = FileLock(os.path.join(args.runs_dir, f"{chain[0]}.lock"), timeout=0).acquire()
    except Timeout:
        print(f"{chain[0]}: another reproduction is on it", flush=True)
        return
    with lock:
        for name in chain:
            if recorded(args, name):
                continue
            if name in trainings:
                ensure_trained(args, name, trainings)
            own = {m: flags for m, (run, flags) in measures.items() if run == name}
            for m, flags in own.items():
                measure(args, m, name, flags, trainings[name][1] if name in trainings else None)
            write_record(args, name, trainings, own)
            if after_each:
                after_each()


def final_checkpoint(args, run, epochs):
    """The checkpoint of a run after its epochs; for "shipped" (no epochs: None), the shipped model."""
    if run == "shipped":
        return SHIPPED
    return os.path.join(args.runs_dir, run, "checkpoint", f"mix_match_{epochs:02d}.pth")


def ensure_trained(args, name, trainings):
    """Train one run to its epochs, unless its final checkpoint is there; a run that continues
    another begins from that run's final checkpoint (trained again first where it is gone: a later
    session on another machine, say), in a folder of its own so that the shorter run stays as it was."""
    flags, epochs, start = trainings[name]
    if os.path.isfile(final_checkpoint(args, name, epochs)):
        return
    if start:
        ensure_trained(args, start, trainings)
    folder = os.path.join(args.runs_dir, name)
    # an interrupted reproduction continues the run from its newest epoch (by number: 187 after 99)
    done = max(glob.glob(os.path.join(folder, "checkpoint", "mix_match_*.pth")), default=None,
               key=lambda path: int(path.rsplit("_", 1)[1].removesuffix(".pth")))
    resume = done or (final_checkpoint(args, start, trainings[start][1]) if start else None)
    run(args, f"training {name}" + (f", from {resume}" if resume else ""), os.path.join(folder, "train.log"),
        *through(name, "train.py"), "--data-root", args.data_root, "--checkpoint-dir",
        os.path.join(folder, "checkpoint"), "--results-dir", os.path.join(folder, "results"), "--epochs", str(epochs),
        *flags, *(["--resume", resume] if resume else []))
    # what it trained on, for its record, which a machine sharing the runs folder may write
    save_json(environment(args.threads), os.path.join(folder, "environment.json"))


def measure(args, name, run_name, flags, epochs):
    """Measure one run after its epochs (unless its JSON is there and whole), its seconds beside the
    JSON; a grid of GRIDS is copied into samples/ at once, while its checkpoint is on disk."""
    folder = os.path.join(args.runs_dir, "metrics")
    if read_json(os.path.join(folder, f"{name}.json")) is None:
        if os.path.isfile(os.path.join(folder, f"{name}.json")):
            print(f"{name}: its JSON is broken (not sample.py's metrics); measuring it again")
        seconds = run(args, f"measuring {name}", os.path.join(folder, f"{name}.log"), *through(run_name, "sample.py"),
                      "--data-root", args.data_root, "--checkpoint", final_checkpoint(args, run_name, epochs),
                      "--metrics", "--json", os.path.join(folder, f"{name}.json"),
                      "--out", os.path.join(folder, f"{name}.png"), *flags)
        save_json(seconds, os.path.join(folder, f"{name}.seconds.json"))
    if name in GRIDS and args.records_dir == RECORDS:  # a scratch reproduction (--verify, the tests) leaves them
        shutil.copyfile(os.path.join(folder, f"{name}.png"), os.path.join(REPO, "samples", GRIDS[name]))


def read_json(path):
    """The measurement's JSON as sample.py wrote it, or None if it is missing or was left broken
    (cut short, edited by another tool)."""
    return metrics_json(read_json_file(path))


def through(run_name, script):
    """The script and its first flags for a run: a variant of section "mechanism" goes through
    tests/one_side_random.py, for its training and its measurements alike."""
    side = next((side for side in SIDES if f"random-{side}-" in run_name), None)
    return [script] if side is None else [os.path.join("tests", "one_side_random.py"), side, script]


def run(args, what, log, script, *script_args):
    """One script with --threads torch threads, its output in `log`; returns its seconds. A failure
    stops the reproduction with its last lines; a script stopped because the scheduler is ending
    this task (STOPPING) is no failure: the task waits for its end, and resumes when requeued."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.time()
    print(what, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if ENDING.is_set():  # a worker between two scripts when the command was told to end
        raise KeyboardInterrupt(signal.SIGTERM)
    with open(log, "w", encoding="utf-8") as f:
        process = subprocess.Popen([sys.executable, os.path.join(REPO, script), *script_args], cwd=REPO, env=env,
                                   stdout=f, stderr=subprocess.STDOUT)
        RUNNING.add(process)
        try:
            returncode = process.wait()
        finally:
            RUNNING.discard(process)
    seconds = time.time() - t0
    print(f"{what}: {seconds:.0f} s", flush=True)
    if returncode != 0 and STOPPING.is_set():
        print(f"{what}: stopped, since the scheduler is ending this task; it resumes from its newest checkpoint "
              f"when the task runs again", flush=True)
        while True:  # the scheduler's SIGKILL follows within its KillWait
            time.sleep(60)
    if returncode != 0:
        with open(log, encoding="utf-8") as f:
            tail = f.read()[-2000:]
        sys.exit(f"{tail}\nerror: {script} failed (exit {returncode}), its log: {log}. "
                 f"Fix the cause and run this command again: it continues where it stopped.")
    return seconds


RUNNING = set()  # the scripts running now, which a task the scheduler ends stops first (tests/reproduce_slurm.py)
STOPPING = threading.Event()  # set once the scheduler is ending this task (preemption, requeue, its time limit)
ENDING = threading.Event()  # set once this command is ending (SIGTERM): no script starts after it


def stop_scripts():
    """The scheduler is ending this task: its scripts end (end_scripts), and run() waits for the end."""
    STOPPING.set()
    end_scripts()


def end_scripts():
    """SIGTERM to the scripts running now (train.py stops between whole files), then wait for them to
    end. Called from a signal handler, which may have interrupted run() in process.wait(): the wait
    here leaves the exit status to it (WNOWAIT), and Popen's lock alone."""
    for process in list(RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
    for process in list(RUNNING):
        with contextlib.suppress(ChildProcessError):
            while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
                time.sleep(0.1)


def end_with_scripts(signum, frame):
    """SIGTERM to this command (kill, a closing terminal): its scripts get it too and end between
    whole files, so that none trains on as an orphan; then the command ends as on Ctrl-C, and the
    same command continues."""
    ENDING.set()
    end_scripts()
    raise KeyboardInterrupt(signum)


def write_record(args, name, trainings, own):
    """samples/records/NAME.json, from the run's final checkpoint and its measurements' JSONs."""
    training = trainings.get(name)
    checkpoint = torch.load(final_checkpoint(args, name, training and training[1]), map_location="cpu",
                            weights_only=True)
    start = training and training[2]
    first_epoch = trainings[start][1] + 1 if start else 1  # a continuation trains the epochs after its start's
    folder = os.path.join(args.runs_dir, "metrics")
    record = {
        "run": name,
        # None for the shipped checkpoint, trained before the records (README, "The shipped model")
        "train": training and {"script": through(name, "train.py"), "flags": training[0], "epochs": training[1],
                               "continues": start, "first_epoch": first_epoch,
                               "seconds": sum(h["seconds"] for h in checkpoint["history"][first_epoch - 1:])},
        "config": checkpoint["config"],
        "history": checkpoint.get("history", []),
        "measurements": {m: {"flags": flags,
                             "seconds": read_seconds(os.path.join(folder, f"{m}.seconds.json")),
                             "metrics": read_json(os.path.join(folder, f"{m}.json"))} for m, flags in own.items()},
        # the machine that trained the run (another one sharing the runs folder, say), else this one
        **(trained_on if isinstance(trained_on := read_json_file(os.path.join(args.runs_dir, name, "environment.json")),
                                  dict) else environment(args.threads)),
    }
    save_json(record, os.path.join(args.records_dir, f"{name}.json"), indent=1)


def read_seconds(path):
    with contextlib.suppress(TypeError, ValueError):
        return float(read_json_file(path))
    return None


def environment(threads):
    """What a record says it ran on: the commit of the code (with "+uncommitted" where tracked
    Python files differ from it), the versions that change a number (VERSIONS), the CPU model and
    its instruction set, the threads."""
    def git(*words):
        result = subprocess.run(["git", "-C", REPO, *words], capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", "*.py"):
        commit += "+uncommitted"
    return {"commit": commit, **versions(), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads}


def versions():
    import platform

    import numpy
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def cpu_model():
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def format_seconds(seconds):
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}"

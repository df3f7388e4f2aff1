"""
Reproduce the report's numbers (samples/README.md; not a test): train every run, measure each with
`sample.py --metrics --json`, keep one record of each in samples/records/, and write every table
and figure of README and the report from those records alone.

    python3 tests/reproduce_results.py --data-root ../shared/data --jobs 2   # about 6 hours on 2 cores
    python3 tests/reproduce_results.py --tables           # the tables and figures, in seconds, from the records
    python3 tests/reproduce_results.py --verify RUN --data-root ../shared/data   # one run again, against its record

Section "results": mix-and-match, fixed and mix-and-match --curriculum-step 1, seeds 0, 1 and 2,
with the tutorial's recipe; each seed-0 model at the temperatures TEMPERATURES, the default model
at test-time alphas TEST_ALPHAS, both conditionings trained at TRAIN_ALPHAS (seed 0); the shipped
checkpoint. Section "latent-use": mix-and-match, fixed and concat with the MLP and the
autoregressive decoder, seeds 0-2, the autoregressive seed-0 runs continued to LONG_EPOCHS.
Section "recurrent": the same with the recurrent decoder and train.py's schedule of teacher
forcing, and mix-and-match and fixed always teacher-forced. Section "fixes": free bits and history
dropout on concat with each expressive decoder, a seed-0 sweep, seeds 1 and 2 at the value it
picks (the most diversity from z alone), then mix-and-match with the better fix. Section
"mechanism": the Sampling redrawn on one side only (tests/one_side_random.py). Every run is
measured at T = 1.

A run is one training (or continuation) and its measurements; its record (samples/records/RUN.json)
holds the flags, the commit of the code, the versions of torch, torchvision, numpy and Python, the
CPU and thread count, the seconds it took to train (the sum of its epochs) and to measure, its
per-epoch history, and each metrics JSON exactly as sample.py wrote it. A run that continues another
(to LONG_EPOCHS) is trained right after it, by the same worker, so that no checkpoint a later step
needs is lost between sessions; the checkpoints and logs live under results/reproduce/ (ignored by
git), the records are committed. A recorded run is never trained again, and an interrupted training
resumes from its newest checkpoint, so the same command continues an interrupted reproduction, on
this machine or on another with the records. --jobs N starts N workers, each with --threads threads
(the cores over N); a lock per chain of runs keeps two reproductions of one machine from training
one run twice (a dead process's lock is taken over). On a cluster, --submit slurm sends the chains
to SLURM as one job array through submitit (tests/reproduce_slurm.py), each task one chain:

    python3 tests/reproduce_results.py --data-root DATA --submit slurm --partition NAME

Its parts, in order: the command (main, plan, chains) and its local workers (reproduce,
do_chain, progress); the plan's sections (training_runs, measurements); running one run
(ensure_trained, measure, run); the records (write_record, read_records); --verify and its
criterion (verify, judge). The documents' tables and figures are tests/reproduce_documents.py,
the cluster's job array tests/reproduce_slurm.py.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

from one_side_random import SIDES
from utils import (
    explain_os_error,
    given,
    mnist_dataset,
    positive_int,
    process_lock,
    save_json,
    writable_dir,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = {"mix-and-match": [], "fixed": ["--conditioning", "fixed"], "curriculum": ["--curriculum-step", "1"]}
SEEDS = (0, 1, 2)
TEMPERATURES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)  # until diversity stops growing
REPORT_TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 12.0)  # the report's table; samples/tables/frontier.md has them all
TEST_ALPHAS, TEST_ALPHA_TEMPERATURES = (32, 96), (1.0, 1.5)  # the default model, sampled with another alpha
TRAIN_ALPHAS = (16, 32, 96, 112)  # 64, the default, is the seed runs
EPOCHS = 50
# latent use: every conditioning with each decoder (run names "concat-seed0", "ar-fixed-seed1", ...)
CONDITIONINGS = {"mix-and-match": [], "fixed": ["--conditioning", "fixed"], "concat": ["--conditioning", "concat"]}
DECODERS = {"mlp": ("", []), "autoregressive": ("ar-", ["--decoder", "autoregressive"])}  # run-name prefix, flags
LONG_EPOCHS = 200  # the autoregressive KLs still fall at epoch 50
SHIPPED = os.path.join(REPO, "checkpoint", "mix_match_50.pth")  # measured as the run "shipped"
# the recurrent decoder: run-name prefix and flags, with train.py's schedule of teacher forcing, and
# always teacher-forced (mix-and-match and fixed only)
RECURRENT = ("rnn-", ["--decoder", "recurrent"])
ALWAYS_FORCED = ("rnn-tf-", ["--decoder", "recurrent", "--teacher-forcing-epochs", "0"], ("mix-and-match", "fixed"))
# the standard fixes for an ignored latent, each on the ordinary CVAE (concat) with each expressive
# decoder: {name: (train.py flag, run-name tag, the seed-0 sweep's values)}. Free bits in nats per
# latent unit (32 units: a floor of 3.2 to 16 nats, from about the autoregressive concat's KL up);
# history dropout as the probability of a zeroed pixel or row, light to heavy
FIXES = {"free bits": ("--free-bits", "fb", (0.1, 0.25, 0.5)),
         "history dropout": ("--history-dropout", "hd", (0.25, 0.5, 0.75))}
EXPRESSIVE = {"autoregressive": DECODERS["autoregressive"], "recurrent": RECURRENT}
SECTIONS = ("recurrent", "latent-use", "fixes", "mechanism", "results")  # the longest chains first, then README's table
REPORT_ORDER = ("results", "latent-use", "recurrent", "mechanism", "fixes")  # the report's sections


RECORDS = os.path.join(REPO, "samples", "records")
# an epoch of each decoder against the MLP's (README, "Speed": tests/bench_train.py --decoders-only; the
# recurrent one fed its own rows), for the time left before a decoder has a record of its own
EPOCH_COST = {"mlp": 1.0, "autoregressive": 1.42, "recurrent": 5.06}
PLAN_AGAIN_SECONDS = 5  # how often an idle worker looks for runs that a running chain's records have added
# sample.py flags added to every measurement: none, the report's measures (the tests' tiny runs: fewer)
MEASURE_FLAGS = []
# the seed-0 completion grids of the report, copied into samples/ as each is measured:
# {measurement: file under samples/}
GRIDS = {"shipped-T1": "sampled.png", "fixed-seed0-T1": "sampled_fixed.png",
         "curriculum-seed0-T1": "sampled_curriculum.png",
         **{f"{prefix}{mode}-seed0-T1": f"sampled_{prefix[:-1]}_{mode}.png" for prefix in ("ar-", "rnn-")
            for mode in ("mix-and-match", "fixed", "concat")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=given, default="./data",
                        help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--runs-dir", type=given, default=os.path.join(REPO, "results", "reproduce"),
                        help="where the runs' checkpoints and logs live (default: results/reproduce)")
    parser.add_argument("--records-dir", type=given, default=RECORDS,
                        help="where the records live (default: samples/records)")
    parser.add_argument("--section", choices=SECTIONS, help="reproduce one section only (default: all of them)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="workers on this machine (default: 1)")
    parser.add_argument("--threads", type=positive_int,
                        help="torch threads per worker (default: the cores over --jobs, at least 1)")
    parser.add_argument("--verify", type=given, metavar="RUN",
                        help="train and measure RUN again in a scratch folder, with its record's thread count, "
                             "and compare with its record")
    parser.add_argument("--tables", action="store_true",
                        help="only write the tables and figures from the records (no MNIST, no training)")
    parser.add_argument("--check", action="store_true",
                        help="with --tables: write nothing, exit 1 naming each document whose tables differ")
    cluster = parser.add_argument_group("on a cluster (tests/reproduce_slurm.py)")
    cluster.add_argument("--submit", choices=("slurm", "local"),
                         help="submit the chains as one job array through submitit, to SLURM or to this machine, "
                              "wait, and write the tables (default: run them here, --jobs at a time)")
    cluster.add_argument("--partition", type=given, help="the SLURM partition (default: the cluster's default)")
    cluster.add_argument("--time", type=positive_int, default=180,
                         help="minutes per task (default: 180; the longest chain took 68 on 1 thread of a Xeon); "
                              "a task that reaches them is requeued and resumes")
    cluster.add_argument("--cpus", type=positive_int, default=1,
                         help="CPUs (torch threads) per task (default: 1, the records' thread count)")
    cluster.add_argument("--gpus", type=int, default=0, choices=range(9), metavar="N",
                         help="GPUs per task, each run on --device auto (default: 0)")
    args = parser.parse_args()
    if args.check and not args.tables:
        parser.error("--check compares the documents' tables: add --tables")
    commands = [flag for flag, value in (("--tables", args.tables), ("--verify", args.verify),
                                         ("--section", args.section)) if value]
    if len(commands) > 1:  # each is a command of its own: one would be ignored
        parser.error(f"{' and '.join(commands)}: give one of them (--tables writes every table, --verify RUN "
                     f"trains one run again, --section NAME reproduces one section)")
    if args.verify and (args.threads or args.jobs != 1):
        parser.error("--verify trains with its record's thread count, on one worker: leave out --threads and --jobs")
    if args.submit and (args.tables or args.verify or args.threads or args.jobs != 1):
        parser.error("--submit runs the reproduction as a job array, --cpus threads per task: leave out --tables, "
                     "--verify, --threads and --jobs")
    # the scripts run in the repository: paths given relative to where this command runs are made whole
    args.data_root, args.runs_dir, args.records_dir = map(os.path.abspath, (args.data_root, args.runs_dir,
                                                                            args.records_dir))
    if not os.path.isdir(args.records_dir):  # a typo would rewrite every table as pending, or start from nothing
        sys.exit(f"error: --records-dir {args.records_dir}: no such folder; for a reproduction from no records, "
                 f"create it first (mkdir -p)")
    sigterm = signal.signal(signal.SIGTERM, end_with_scripts)
    try:
        if args.tables:
            sys.exit(write_documents(args.records_dir, check=args.check))
        args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        records = read_records(args.records_dir)  # a broken record ends here, before any training
        if args.verify and args.verify not in records:
            sys.exit(f"error: no record of a run named {args.verify!r}; the runs recorded: "
                     f"{', '.join(sorted(records)) or 'none yet'}")
        if args.verify:
            verify_chain(args.verify, records)  # a continuation whose start is not recorded ends here
            difference = plan_difference(args, records, args.verify)
            if difference:  # a record copied under another run's name would verify the other run
                sys.exit(f"error: the record of {args.verify} is not of the run the plan gives that name: "
                         f"{difference}. Restore it with git checkout, or delete it to train and measure that run "
                         f"again")
        for train in (True, False):  # a wrong --data-root ends here, not in the first of many trainings
            mnist_dataset(args.data_root, train)
        if os.path.exists(args.runs_dir) and not os.path.isdir(args.runs_dir):
            sys.exit(f"error: --runs-dir {args.runs_dir} is a file, not a folder; pass another --runs-dir")
        # every folder it will write, the ones it derives too, before the first run: not a full disk's
        # message, hours in, for a folder that cannot be written
        writable_dir(args.runs_dir, "--runs-dir")
        if args.submit:
            writable_dir(os.path.join(args.runs_dir, "slurm"), "--runs-dir",
                         derived="the tasks' logs and the list of tasks submitted")
        if not args.verify:
            writable_dir(args.records_dir, "--records-dir")
            writable_dir(os.path.join(documents_root(), "samples", "tables"), "the repository",
                         derived="the tables the records give")
        if args.submit:
            sys.exit(submit(args))
        sys.exit(verify(args, records) if args.verify else reproduce(args))
    except KeyboardInterrupt as e:  # the scripts got the Ctrl-C or the SIGTERM too, and left their files whole
        message = ("interrupted: the runs and measurements finished so far are kept; run the same command again to "
                   "continue (an interrupted training resumes from its last checkpoint)")
        if e.args == (signal.SIGTERM,):  # as a shell reports a process ended by it
            print(message, file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        sys.exit(message)
    except OSError as e:  # a full disk while writing a log, a record or a table
        sys.exit(f"error: {explain_os_error(e)}, then run the same command again to continue; the finished runs are "
                 f"kept.")
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # as it was: a test may call main() in its own process


def submit(args):
    """The reproduction as a job array through submitit (tests/reproduce_slurm.py), which needs
    submitit and, for SLURM, sbatch: each missing one is named before any work."""
    try:
        import reproduce_slurm
    except ImportError as e:
        sys.exit(f"error: --submit needs {e.name}: pip install submitit")
    return reproduce_slurm.submit(args, [args.section] if args.section else SECTIONS)


def documents_root():
    """Where README.md and samples/ are written (tests/reproduce_documents.py's DOCUMENT_ROOT)."""
    import reproduce_documents
    return reproduce_documents.DOCUMENT_ROOT


def write_documents(records_dir, check=False):
    """The documents' tables and figures from the records (tests/reproduce_documents.py, which
    reads this file's plan: imported where it is needed)."""
    import reproduce_documents

    return reproduce_documents.write_documents(records_dir, check)


def plan(args, sections):
    """({run: (train.py flags, epochs, the run it continues or None)}, {measurement: (run, sample.py
    flags)}) of the sections, as far as the measurements so far decide it (the fixes' later runs)."""
    trainings, measures = {}, {}
    for section in sections:
        trainings.update(training_runs(section, args))
        measures.update(measurements(section, args))
    return trainings, measures


def plan_difference(args, records, run):
    """How the record of `run` differs from what the plan gives that name: train.py's flags, its
    epochs and the run it continues, and each measurement's sample.py flags; None where it does not
    (or where the plan has no such run)."""
    trainings, measures = plan(args, SECTIONS)
    record, differences = records[run], []
    if run in trainings and record["train"]:
        train = record["train"]
        recorded = (train["flags"], train["epochs"], train["continues"])
        if recorded != trainings[run]:
            differences.append("trained as (flags, epochs, the run it continues) {} where the plan gives {}".format(
                *(f"({shlex.join(flags)}, {epochs}, {continues})" for flags, epochs, continues in
                  (recorded, trainings[run]))))
    for m, (planned_run, flags) in chain_measures([run], measures).items():  # the flags whole, as measured
        measurement = record["measurements"].get(m)
        if measurement and (planned_run, flags) != (run, measurement["flags"]):
            differences.append(f"{m} measured with {shlex.join(measurement['flags'])} where the plan gives "
                               f"{shlex.join(flags)}")
    return "; ".join(differences) or None


def chains(trainings, measures):
    """[[run, the runs that continue it, ...]]: a run trained from scratch (or the shipped one,
    measured only) and its continuations, in the order of the plan (the longest chains first)."""
    continued = {}
    for name, (_, _, start) in trainings.items():
        if start:
            continued.setdefault(start, []).append(name)
    bases = [name for name, (_, _, start) in trainings.items() if start is None]
    bases += sorted({run for run, _ in measures.values()} - set(trainings))  # "shipped"
    return [[base, *continued.get(base, [])] for base in bases]


def reproduce(args):
    """Train, measure and record every run of the sections with --jobs workers, then write the
    documents' tables. Returns the exit code."""
    sections = [args.section] if args.section else SECTIONS
    t0, guard, taken, busy, failures = time.time(), threading.Lock(), set(), [0], []

    def next_chain():
        """The next chain no worker of this process has taken, planned again from the records and
        measurements so far; None when there is none left for this process."""
        while True:
            with guard:
                if failures:
                    return None
                trainings, measures = plan(args, sections)
                left = [chain for chain in chains(trainings, measures) if chain[0] not in taken
                        and not all(recorded(args, run) for run in chain)]
                if left:
                    taken.add(left[0][0])
                    busy[0] += 1
                    return left[0], trainings, measures
                if not busy[0]:  # a running chain of this process may still add runs (the fixes' seeds)
                    return None
            time.sleep(PLAN_AGAIN_SECONDS)

    def worker():
        while (job := next_chain()) is not None:
            chain, trainings, measures = job
            try:
                do_chain(args, chain, trainings, chain_measures(chain, measures),
                         lambda t=trainings, m=measures: print(progress(args, t, m, t0), flush=True))
            except BaseException as e:  # noqa: BLE001 (a failed script's SystemExit, say): the other workers stop
                failures.append(e)
                if args.jobs > 1:
                    print(f"{e}\nthe other workers finish the runs they are on, then the reproduction stops",
                          flush=True)
            finally:
                with guard:
                    busy[0] -= 1

    if args.jobs == 1:
        worker()
    else:
        workers = [threading.Thread(target=worker, daemon=True) for _ in range(args.jobs)]
        for thread in workers:
            thread.start()
        for thread in workers:
            while thread.is_alive():
                thread.join(1)  # in steps, so that Ctrl-C reaches this thread
    if failures:
        raise failures[0]
    trainings, measures = plan(args, sections)
    others = [chain[0] for chain in chains(trainings, measures) if not all(recorded(args, run) for run in chain)]
    if others:  # taken by another process or machine, which writes the tables once it ends
        print(f"another reproduction is working on {', '.join(others)}: run this command again once it has ended, "
              f"to finish those and write the tables")
        return 1
    print(f"every run is recorded ({format_seconds(time.time() - t0)})")
    return write_documents(args.records_dir)


def do_chain(args, chain, trainings, measures, after_each=None):
    """Train, measure and record each run of a chain that is not recorded yet, holding the chain's
    lock (a chain another process of this machine holds is left to it); measures: the chain's
    measurements, {name: (run, sample.py flags)}, chain_measures. after_each() runs after each record."""
    os.makedirs(args.runs_dir, exist_ok=True)
    with process_lock(os.path.join(args.runs_dir, f"{chain[0]}.lock")) as holder:
        if holder:
            print(f"{chain[0]}: another reproduction ({holder}) is on it", flush=True)
            return
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


def chain_measures(chain, measures):
    """The measurements of a chain's runs, each with its sample.py flags whole (MEASURE_FLAGS added):
    all a worker, here or on a cluster, needs of the plan besides the trainings."""
    return {m: (run, [*flags, *MEASURE_FLAGS]) for m, (run, flags) in measures.items() if run in chain}


def progress(args, trainings, measures, t0):
    """'41/150 runs recorded, 1:02 so far, about 4:40 left': the time left from the records' seconds
    (per epoch for each decoder, per measurement), over the workers."""
    records = read_records(args.records_dir)
    runs = [name for chain in chains(trainings, measures) for name in chain]
    left = [name for name in runs if name not in records]
    epoch_seconds, measure_seconds = {}, []
    for record in records.values():
        if record["train"]:
            first = record["train"]["first_epoch"]
            epoch_seconds.setdefault(record["config"]["decoder"], []).extend(
                h["seconds"] for h in record["history"][first - 1:])
        measure_seconds += [m["seconds"] for m in record["measurements"].values() if m["seconds"] is not None]
    done = f"{len(runs) - len(left)}/{len(runs)} runs recorded, {format_seconds(time.time() - t0)} so far"
    if not epoch_seconds:
        return done
    estimate, rough = 0.0, False
    for name in left:
        if name in trainings:
            _, epochs, start = trainings[name]
            decoder = decoder_of(name, trainings)
            rough |= decoder not in epoch_seconds
            if decoder in epoch_seconds:
                seconds = statistics.median(epoch_seconds[decoder])
            else:  # no record of this decoder yet: a recorded one's epochs, scaled by their costs
                known = next(iter(epoch_seconds))
                seconds = statistics.median(epoch_seconds[known]) * EPOCH_COST[decoder] / EPOCH_COST[known]
            estimate += seconds * (epochs - (trainings[start][1] if start else 0))
        estimate += statistics.median(measure_seconds or [0]) * sum(run == name for run, _ in measures.values())
    return (f"{done}, about {format_seconds(estimate / args.jobs)} left"
            + (" (rough: a decoder without records yet is estimated from another's)" if rough else ""))


def decoder_of(name, trainings):
    """The decoder of a planned run (a continuation's is the one of the run it continues)."""
    flags, _, start = trainings[name]
    if start:
        return decoder_of(start, trainings)
    return flags[flags.index("--decoder") + 1] if "--decoder" in flags else "mlp"


def format_seconds(seconds):
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}"


# ----------------------------------------------------------------------------- the plan

def latent_runs():
    """{run name: train.py flags} of the latent-use grid: conditioning x decoder x seed."""
    return {f"{prefix}{mode}-seed{seed}": [*flags, *decoder_flags, "--seed", str(seed)]
            for prefix, decoder_flags in DECODERS.values() for mode, flags in CONDITIONINGS.items() for seed in SEEDS}


def recurrent_runs():
    """{run name: train.py flags} of the recurrent decoder: conditioning x seed with the schedule of
    teacher forcing, and mix-and-match and fixed always teacher-forced."""
    prefix, decoder_flags = RECURRENT
    runs = {f"{prefix}{mode}-seed{seed}": [*flags, *decoder_flags, "--seed", str(seed)]
            for mode, flags in CONDITIONINGS.items() for seed in SEEDS}
    prefix, decoder_flags, modes = ALWAYS_FORCED
    runs.update({f"{prefix}{mode}-seed{seed}": [*CONDITIONINGS[mode], *decoder_flags, "--seed", str(seed)]
                 for mode in modes for seed in SEEDS})
    return runs


def expressive_runs(modes):
    """{run name: train.py flags} of the latent-use and recurrent runs (the recurrent with the
    schedule) of the expressive decoders with these conditionings: the plain runs that sections
    "fixes" and "mechanism" stand beside, named alike so that they are trained once."""
    starts = tuple(f"{prefix}{mode}-" for prefix, _ in EXPRESSIVE.values() for mode in modes)
    return {name: flags for name, flags in {**latent_runs(), **recurrent_runs()}.items() if name.startswith(starts)}


def fix_prefix(prefix, tag, value, mode="concat"):
    """The run-name prefix of a decoder's conditioning with a fix: "ar-concat-fb0.25"."""
    return f"{prefix}{mode}-{tag}{value:g}"


def fix_runs(prefix, fix, value, seeds, mode="concat"):
    """{run name: train.py flags} of a conditioning with a fix at a value, with the decoder of prefix."""
    decoder_flags = next(flags for p, flags in EXPRESSIVE.values() if p == prefix)
    flag, tag, _ = FIXES[fix]
    return {f"{fix_prefix(prefix, tag, value, mode)}-seed{seed}": [*CONDITIONINGS[mode], *decoder_flags, flag,
                                                                   f"{value:g}", "--seed", str(seed)]
            for seed in seeds}


def picked_values(metrics):
    """{(decoder's run-name prefix, fix): the value its seed-0 sweep picks}, the one with the most
    diversity from z alone (what the fix is for; the sweep's table shows what it costs), for each
    sweep whose runs are all measured."""
    picks = {}
    for prefix, _ in EXPRESSIVE.values():
        for fix, (_, tag, values) in FIXES.items():
            runs = [metrics.get(f"{fix_prefix(prefix, tag, value)}-seed0-T1") for value in values]
            if None not in runs:
                picks[prefix, fix] = max(zip(values, runs), key=lambda v: v[1]["metrics"]["diversity_z"]["model"])[0]
    return picks


def better_fixes(metrics, picks):
    """{decoder's run-name prefix: the fix whose concat runs, at its picked value, have the more
    diversity from z alone over the seeds}, for each decoder whose fixes' seeds are all measured."""
    better = {}
    for prefix, _ in EXPRESSIVE.values():
        names = {fix: [f"{fix_prefix(prefix, FIXES[fix][1], picks[prefix, fix])}-seed{seed}-T1" for seed in SEEDS]
                 for fix in FIXES if (prefix, fix) in picks}
        if len(names) == len(FIXES) and all(metrics.get(n) for runs in names.values() for n in runs):
            better[prefix] = max(names, key=lambda fix: statistics.mean(
                metrics[n]["metrics"]["diversity_z"]["model"] for n in names[fix]))
    return better


def fixes_runs(args):
    """{run name: train.py flags} of section "fixes", each part once the one before is measured:
    the sweep and the plain runs of each expressive decoder; seeds 1 and 2 of each fix at its
    picked value; mix-and-match with the better fix, seeds 0, 1 and 2 (do they add up?)."""
    runs = {name: flags for prefix, _ in EXPRESSIVE.values() for fix, (_, _, values) in FIXES.items()
            for value in values for name, flags in fix_runs(prefix, fix, value, [0]).items()}
    runs.update(expressive_runs(CONDITIONINGS))
    picks = picked_values(measured(args, runs))
    for (prefix, fix), value in picks.items():
        runs.update(fix_runs(prefix, fix, value, SEEDS[1:]))
    for prefix, fix in better_fixes(measured(args, runs), picks).items():
        runs.update(fix_runs(prefix, fix, picks[prefix, fix], SEEDS, "mix-and-match"))
    return runs


def mechanism_runs():
    """{run name: train.py flags} of section "mechanism": with each expressive decoder, the Sampling
    redrawn on one side only ("ar-random-decoder-seed0": tests/one_side_random.py trains it), and
    mix-and-match and fixed, the runs of "latent-use" and "recurrent"."""
    runs = {f"{prefix}random-{side}-seed{seed}": [*flags, "--seed", str(seed)]
            for prefix, flags in EXPRESSIVE.values() for side in SIDES for seed in SEEDS}
    runs.update(expressive_runs(("mix-and-match", "fixed")))
    return runs


def measured(args, runs):
    """{measurement name: its JSON} of the runs recorded with their measurement at T = 1."""
    return {name: m for name, m in recorded_measurements(args.records_dir).items()
            if name.endswith("-T1") and name.removesuffix("-T1") in runs}


def recorded_measurements(records_dir):
    """{measurement name: the metrics JSON sample.py wrote} of every record."""
    return measurements_of(read_records(records_dir))


def measurements_of(records):
    return {name: m["metrics"] for record in records.values() for name, m in record["measurements"].items()}


def fixes_rows(picks, better):
    """(row label, run-name prefix) of README's table of fixes: per decoder, the three conditionings,
    concat with each fix at its picked value, and mix-and-match with the better fix."""
    rows = []
    for decoder, (prefix, _) in EXPRESSIVE.items():
        rows += [(f"{decoder}, {mode}", f"{prefix}{mode}") for mode in CONDITIONINGS]
        rows += [(f"{decoder}, {mode} + {fix} {picks[prefix, fix]:g}",
                  fix_prefix(prefix, FIXES[fix][1], picks[prefix, fix], mode))
                 for fix, mode in [*((fix, "concat") for fix in FIXES), (better[prefix], "mix-and-match")]]
    return rows


def fixes_pairs(picks, better):
    """Each fix against Mix-and-Match and against the plain concat; Mix-and-Match with the better
    fix against Mix-and-Match and against concat with that fix; all with the same decoder."""
    pairs = []
    for prefix, _ in EXPRESSIVE.values():
        for fix, (_, tag, _) in FIXES.items():
            pairs += [(fix_prefix(prefix, tag, picks[prefix, fix]), f"{prefix}{mode}")
                      for mode in ("mix-and-match", "concat")]
        fix, tag = better[prefix], FIXES[better[prefix]][1]
        both = fix_prefix(prefix, tag, picks[prefix, fix], "mix-and-match")
        pairs += [(both, f"{prefix}mix-and-match"), (both, fix_prefix(prefix, tag, picks[prefix, fix]))]
    return pairs


def grid_and_long_prefix(section):
    """The runs of a latent-use section, and the run-name prefix of those continued to LONG_EPOCHS."""
    return (latent_runs(), "ar-") if section == "latent-use" else (recurrent_runs(), RECURRENT[0])


def training_runs(section, args):
    """{run name: (train.py flags, epochs, the run it continues or None)} for a section's trainings."""
    if section == "fixes":
        return {name: (flags, EPOCHS, None) for name, flags in fixes_runs(args).items()}
    if section == "mechanism":
        return {name: (flags, EPOCHS, None) for name, flags in mechanism_runs().items()}
    if section in ("latent-use", "recurrent"):
        grid, prefix = grid_and_long_prefix(section)
        # the longest chains first (seed 0, then its continuation), so that two reproductions share the work
        runs = {f"{prefix}{mode}-seed0": (grid[f"{prefix}{mode}-seed0"], EPOCHS, None) for mode in CONDITIONINGS}
        runs.update({f"{prefix}{mode}-seed0-long": ([], LONG_EPOCHS, f"{prefix}{mode}-seed0")
                     for mode in CONDITIONINGS})
        runs.update({name: (flags, EPOCHS, None) for name, flags in grid.items() if name not in runs})
        return runs
    runs = {f"{mode}-seed{seed}": [*flags, "--seed", str(seed)] for mode, flags in MODES.items() for seed in SEEDS}
    runs.update({f"{mode}-alpha{alpha}": [*MODES[mode], "--alpha", str(alpha)]
                 for mode in ("mix-and-match", "fixed") for alpha in TRAIN_ALPHAS})
    return {name: (flags, EPOCHS, None) for name, flags in runs.items()}


def measurements(section, args=None):
    """{measurement name: (run name, sample.py flags)} for a section's metrics runs."""
    if section == "fixes":
        return {f"{name}-T1": (name, []) for name in fixes_runs(args)}
    if section == "mechanism":
        return {f"{name}-T1": (name, []) for name in mechanism_runs()}
    if section in ("latent-use", "recurrent"):
        grid, prefix = grid_and_long_prefix(section)
        todo = {f"{name}-T1": (name, []) for name in grid}
        todo.update({f"{prefix}{mode}-seed0-long-T1": (f"{prefix}{mode}-seed0-long", []) for mode in CONDITIONINGS})
        return todo
    todo = {f"{mode}-seed{seed}-T1": (f"{mode}-seed{seed}", []) for mode in MODES for seed in SEEDS}
    todo["shipped-T1"] = ("shipped", [])  # trained on another CPU: its own column
    todo.update({f"{mode}-seed0-T{t:g}": (f"{mode}-seed0", ["--temperature", f"{t:g}"])
                 for mode in MODES for t in TEMPERATURES})
    todo.update({f"mix-and-match-seed0-testalpha{alpha}-T{t:g}": ("mix-and-match-seed0",
                                                                  ["--alpha", str(alpha), "--temperature", f"{t:g}"])
                 for alpha in TEST_ALPHAS for t in TEST_ALPHA_TEMPERATURES})
    todo.update({f"{mode}-alpha{alpha}-T1": (f"{mode}-alpha{alpha}", [])
                 for mode in ("mix-and-match", "fixed") for alpha in TRAIN_ALPHAS})
    return todo


def final_checkpoint(args, run, epochs=None):
    if run == "shipped":
        return SHIPPED
    epochs = epochs or (LONG_EPOCHS if run.endswith("-long") else EPOCHS)
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


def measure(args, name, run_name, flags, epochs=None):
    """Measure one run (unless its JSON is there and whole), its seconds beside the JSON; a grid of
    GRIDS is copied into samples/ at once, while its checkpoint is on disk."""
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


def metrics_json(measurement):
    """The measurement if it is a metrics JSON of sample.py's (a dict with its "metrics" and the
    accuracy of the classifier that judged them), else None."""
    return measurement if isinstance(measurement, dict) and isinstance(measurement.get("metrics"), dict) and \
        isinstance(measurement.get("classifier_accuracy"), float) else None


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


# ----------------------------------------------------------------------------- records

RECORD_KEYS = ("run", "train", "config", "history", "measurements", "commit", "torch", "cpu", "cpu_capability",
               "threads")


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


def read_json_file(path):
    """What the JSON file holds, or None where it is missing or broken."""
    with contextlib.suppress(OSError, ValueError), open(path, encoding="utf-8") as f:
        return json.load(f)
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


# what changes a number besides the code and the CPU: torch's kernels; torchvision (MNIST's decoding
# and the completion grids); numpy (the KL weight's exp); Python. The records before these fields
# name torch alone
VERSIONS = ("torch", "torchvision", "numpy", "python")


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


def read_records(folder):
    """{run: record} of every record in the folder; a broken one (cut short, edited, another
    layout, a number that is not one) ends the command in one line naming it, before anything is
    written."""
    records = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f, parse_constant=not_a_number, parse_float=finite)
        except (OSError, ValueError) as e:
            reason = str(e) if type(e) is ValueError else type(e).__name__  # a NaN says so; a cut file its kind
            sys.exit(f"error: the record {path} cannot be read ({reason}): restore it with git checkout, or delete it "
                     f"to train and measure that run again")
        problem = record_problem(record, os.path.basename(path).removesuffix(".json"))
        if problem:
            sys.exit(f"error: the record {path} is not one of this reproduction's ({problem}): restore it with git "
                     f"checkout, or delete it to train and measure that run again")
        records[record["run"]] = record
    loop = continuation_loop(records)
    if loop:  # every walk along the continuations would go round it for ever
        sys.exit(f"error: the records in {folder} continue each other in a loop ({' continues '.join(loop)}): "
                 f"restore them with git checkout, or delete one to train and measure it again")
    return records


def not_a_number(constant):
    raise ValueError(f"{constant} where a number should be")


def finite(text):
    """A JSON number as a float, refused where it is too large for one (1e999 reads as infinity)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} where a finite number should be")
    return value


def continuation_loop(records):
    """[run, the run it continues, ..., run] of a loop among the records' continuations, from its
    first run by name, or None."""
    for start in records:
        seen, run = [], start
        while run in records and records[run]["train"] and records[run]["train"]["continues"]:
            if run in seen:
                loop = seen[seen.index(run):]
                first = loop.index(min(loop))
                return [*loop[first:], *loop[:first], min(loop)]
            seen.append(run)
            run = records[run]["train"]["continues"]
    return None


def record_problem(record, name):
    """What is wrong with a record of the run `name`, in a few words, or None: each field the
    tables, the progress and --verify read, of the type they read."""
    def number(value, none=False):
        return (value is None and none) or is_number(value)

    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a record"
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        return f"no {', '.join(missing)}"
    if record["run"] != name:
        return f"the run {record['run']!r}"
    train = record["train"]
    if train is not None and not (
            isinstance(train, dict) and isinstance(train.get("flags"), list) and isinstance(train.get("epochs"), int)
            and isinstance(train.get("first_epoch"), int) and number(train.get("seconds"))
            and isinstance(train.get("continues"), (str, type(None)))):
        return "a train field without its flags, epochs, first epoch, seconds and the run it continues"
    if not isinstance(record["config"], dict):
        return "a config that is not the checkpoint's"
    history = record["history"]
    if not isinstance(history, list) or not all(
            isinstance(h, dict) and isinstance(h.get("epoch"), int) and number(h.get("seconds"))
            and all(number(v, none=True) for v in h.values()) for h in history):
        return "a history whose epochs are not numbers, each with its epoch and seconds"
    if not isinstance(record["measurements"], dict):
        return "measurements that are not a table of measurements"
    for m, measurement in record["measurements"].items():
        if not isinstance(measurement, dict) or metrics_json(measurement.get("metrics")) is None:
            return f"the measurement {m} is not sample.py's metrics JSON"
        if not isinstance(measurement.get("flags"), list) or "seconds" not in measurement or not number(
                measurement["seconds"], none=True):
            return f"the measurement {m} has no flags or seconds"
        metrics = measurement["metrics"]
        if not number(metrics.get("temperature")) or not all(
                isinstance(v, dict) and isinstance(v.get("name"), str) and number(v.get("model"), none=True)
                and number(v.get("real_top"), none=True) for v in metrics["metrics"].values()):
            return f"the measurement {m} has a measure that is not a number, or no temperature"
    if not (isinstance(record["threads"], int) and record["threads"] >= 1) or not all(
            isinstance(record[key], str) for key in ("torch", "cpu", "cpu_capability")):
        return "no thread count, torch, CPU or instruction set"
    return None


def is_number(value):
    """A number of a record: an int or a float, not a bool (JSON's true), not None (n/a)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def recorded(args, name):
    return os.path.isfile(os.path.join(args.records_dir, f"{name}.json"))


def through(run_name, script):
    """The script and its first flags for a run: a variant of section "mechanism" goes through
    tests/one_side_random.py, for its training and its measurements alike."""
    side = next((side for side in SIDES if f"random-{side}-" in run_name), None)
    return [script] if side is None else [os.path.join("tests", "one_side_random.py"), side, script]


# ----------------------------------------------------------------------------- verify

def verify(args, records):
    """Train and measure one recorded run again in a scratch folder, with its record's thread
    count, keep what it gave (RUNS_DIR/verify/RUN.json) and compare (compare): bit for bit where
    this machine is of the record's kind, elsewhere in seed sds. Returns the exit code: 0 where the
    run reproduces, 1 where it does not."""
    record = records[args.verify]
    chain = verify_chain(args.verify, records)
    trainings = {name: (records[name]["train"]["flags"], records[name]["train"]["epochs"],
                        records[name]["train"]["continues"]) for name in chain if records[name]["train"]}
    with tempfile.TemporaryDirectory(prefix="verify-") as scratch:
        again = argparse.Namespace(**{**vars(args), "runs_dir": scratch, "records_dir": os.path.join(scratch, "r"),
                                      "threads": record["threads"]})
        if args.verify in trainings:
            ensure_trained(again, args.verify, trainings)
        own = {m: measurement["flags"] for m, measurement in record["measurements"].items()}
        for m, flags in own.items():
            measure(again, m, args.verify, flags, record["train"] and record["train"]["epochs"])
        write_record(again, args.verify, trainings, own)
        new = read_records(again.records_dir)[args.verify]
    # the run as measured here, kept (the scratch folder is not) so that it can be judged again or committed
    kept = os.path.join(args.runs_dir, "verify", f"{args.verify}.json")
    save_json(new, kept, indent=1)
    print(f"{args.verify} as trained and measured here: {kept}")
    return compare(record, new, records)


# --verify on another kind of machine. Each number of a run (its history, epoch by epoch, and every
# measure of every measurement) is judged in units of the seed spread of its own kind: the sd over
# the seeds of the same number (the same epoch and loss; the same measure), pooled over every family
# of the run's decoder whose three seeds are recorded (three seeds alone give an sd that is now and
# then ten times too small). The measure at T = 1 stands in for the temperatures and test-time
# alphas, measured on seed 0 alone: a seed's spread is one of the trained model, which they share.
# Rounding starts at the last bit and grows over the epochs; another run differs from the first
# epoch on: the first EARLY_EPOCHS tell the run from another (on the records' pairs the farthest
# run trained again and the nearest other seed lie either side of HISTORY_LIMIT, by a factor of two:
# samples/README.md, "Checking one run"). The measures are less telling: rounding moves the k-NN
# and classifier ones by half a seed sd or more (a completion near a neighbour's radius flips)
EARLY_EPOCHS = 10
HISTORY_LIMIT = 0.35  # the first epochs' root mean square, in seed sds: one test per run, whatever its length
FALSE_ALARM = 0.01  # each number's limit: a run a seed sd from its record fails with this chance at most
AGREE = 1e-6  # a number its seeds agree on exactly (32 active units, the KL weight) agrees to this, relative


def verify_chain(run, records):
    """[the run it continues from scratch, ..., run]: the recorded runs --verify trains, in order."""
    chain = [run]
    while records[chain[0]]["train"] and records[chain[0]]["train"]["continues"]:
        start = records[chain[0]]["train"]["continues"]
        if start not in records:
            sys.exit(f"error: {chain[0]} continues {start}, which has no record: "
                     f"restore {start}.json with git checkout to verify {run}")
        chain.insert(0, start)
    return chain


def numbers(record):
    """{name: value} of what a run gives that a rerun must give again: its history ("epoch 3
    test_loss"; not the seconds) and its measures, named by their measurement without the run
    ("T1 kl", "testalpha32-T1.5 recall")."""
    values = {f"epoch {h['epoch']} {key}": value for h in record["history"] for key, value in h.items()
              if key not in ("epoch", "seconds")}
    for m, measurement in record["measurements"].items():
        kind = m.removeprefix(f"{record['run']}-")
        values.update({f"{kind} {key}": value["model"] for key, value in measurement["metrics"]["metrics"].items()})
    return values


def family(run):
    """The family of a seed's run ("mix-and-match" of "mix-and-match-seed1"), or None."""
    match = re.fullmatch(r"(.+)-seed(\d+)", run)
    return match[1] if match and int(match[2]) in SEEDS else None


def seed_spreads(run, records):
    """{number name: its seed sd, pooled over the families of the run's decoder with every seed
    recorded}: each epoch of the history (a continuation's later epochs: the seeds' last) and each
    measure at T = 1, which stands in for the run's other measurements of it. {} where no family
    of its decoder has all its seeds."""
    decoder = decoder_in(records.get(run))
    families = {}
    for name, record in records.items():
        if family(name) and decoder_in(record) == decoder:
            families.setdefault(family(name), []).append(numbers(record))
    squares, freedoms = {}, {}
    for seeds in families.values():
        if len(seeds) != len(SEEDS):
            continue
        for name in seeds[0]:
            column = [values.get(name) for values in seeds]
            if all(map(is_number, column)):
                mean = sum(column) / len(column)
                squares[name] = squares.get(name, 0.0) + sum((v - mean) ** 2 for v in column)
                freedoms[name] = freedoms.get(name, 0) + len(column) - 1
    spread = {name: (squares[name] / freedoms[name]) ** 0.5 for name in squares}
    last = max((int(name.split()[1]) for name in spread if name.startswith("epoch ")), default=0)
    by_key = {name.split(" ", 1)[1]: sd for name, sd in spread.items() if name.startswith("T1 ")}
    by_key.update({name.split(" ", 2)[2]: sd for name, sd in spread.items() if name.startswith(f"epoch {last} ")})
    for name in numbers(records[run]) if run in records else ():  # a later epoch, another measurement
        if name not in spread:
            key = name.split(" ", 2)[2] if name.startswith("epoch ") else name.split(" ", 1)[1]
            if key in by_key:
                spread[name] = by_key[key]
    return spread


def decoder_in(record):
    return (record or {}).get("config", {}).get("decoder", "mlp")


def number_limit(count):
    """The most seed sds one of `count` numbers may be from its record: the two-sided normal bound
    at FALSE_ALARM / count (Bonferroni), so that a run of 465 numbers fails by chance no more often
    than a run of 21, if each number were as far from its record as a seed is from the seeds' mean."""
    return statistics.NormalDist().inv_cdf(1 - FALSE_ALARM / (2 * count))


def judge(old, new, spread):
    """How far the numbers `new` are from `old` ({name: value}), in seed sds: {"rows": [(name, old,
    new, sds; None where it has no spread)], "history" (the root mean square of the first
    EARLY_EPOCHS) and "measures" (of every measure),
    "worst", "limit", "judged" (how many), "failing": [names], "agrees"}. A number new has and old
    has not (a newer history field) is not judged."""
    rows, failing = [], []
    for name, value in old.items():
        now = new.get(name)
        if not (is_number(value) and is_number(now)):
            rows.append((name, value, now, None))  # n/a, a missing number: equal or not at all
            if value != now:
                failing.append(name)
            continue
        sd = spread.get(name)
        if sd == 0:  # the seeds agree exactly: so must the run, up to rounding
            sds = 0.0 if abs(now - value) <= AGREE * max(abs(value), abs(now)) else float("inf")
        else:
            sds = None if sd is None else abs(now - value) / sd
        rows.append((name, value, now, sds))
    # a number held more than once counts once: the posterior's measures (KL, active units, the
    # likelihoods) do not depend on the temperature, and each measurement at one alpha repeats them
    distinct = {name if name.startswith("epoch ") else (name.rsplit(" ", 1)[-1], value, now): (name, sds)
                for name, value, now, sds in rows if sds is not None and spread.get(name) != 0}
    judged = [sds for _, sds in distinct.values()]
    limit = number_limit(max(len(judged), 1))
    failing += [name for name, *_, sds in rows if sds is not None and sds > limit]

    def rms(values):
        return (sum(v * v for v in values) / len(values)) ** 0.5 if values else 0.0
    history = rms([sds for name, sds in distinct.values()
                   if name.startswith("epoch ") and int(name.split()[1]) <= EARLY_EPOCHS])
    measures = rms([sds for name, sds in distinct.values() if not name.startswith("epoch ")])
    return {"rows": rows, "history": history, "measures": measures, "worst": max(judged, default=None),
            "limit": limit, "judged": len(judged), "failing": failing,
            "agrees": bool(judged) and not failing and history <= HISTORY_LIMIT}


def same_kind(record, new):
    """Whether a run measured again ran where its record's run did: the same CPU model, instruction
    set and versions (a version the record does not name, from before the field, is not compared)."""
    return all(record.get(key) == new.get(key) for key in ("cpu", "cpu_capability", *VERSIONS) if key in record)


def compare(record, new, records):
    """Print the verdict on a run measured again (new) against its record, the numbers closest to
    their limit, then every number; return the exit code (0: it reproduces, 1: it does not)."""
    old_numbers, new_numbers = numbers(record), numbers(new)
    kind = same_kind(record, new)
    unnamed = [key for key in VERSIONS if key not in record]
    where = (f"{record['threads']} thread(s), this machine of the record's kind" if kind else
             f"{record['threads']} thread(s), the record's {describe(record)} against this {describe(new)}")
    if kind:  # bit for bit, history and measures (a number the record has not, a field added since, aside)
        differing = [name for name in old_numbers if old_numbers[name] != new_numbers.get(name)]
        verdict = (f"{record['run']} agrees with its record bit for bit" if not differing else
                   f"{record['run']} does not agree with its record: {len(differing)} of {len(old_numbers)} "
                   f"numbers differ, where this machine is of the record's kind"
                   + (f" (the record names no {', '.join(unnamed)}: the report's \"Checking one run\" names "
                      f"the versions to install)"
                      if unnamed else ""))
        print(f"{verdict}\n{where}")
        closest = sorted(differing, key=lambda name: -relative(old_numbers.get(name), new_numbers.get(name)))
        print_numbers("the most different", closest[:5], old_numbers, new_numbers, {})
        print_numbers("every number", list(old_numbers), old_numbers, new_numbers, {})
        return 1 if differing else 0
    spread = seed_spreads(record["run"], records)
    verdict = judge(old_numbers, new_numbers, spread)
    if not verdict["judged"]:
        print(f"{record['run']} cannot be judged: the records hold no family of its decoder "
              f"({decoder_in(record)}) with seeds {', '.join(map(str, SEEDS))} to give its numbers a spread")
        return 1
    failing = verdict["failing"]
    why = ", ".join(failing[:5]) + (f" and {len(failing) - 5} more" if len(failing) > 5 else "")
    print(f"{record['run']} reproduces its record up to rounding" if verdict["agrees"] else
          f"{record['run']} does not reproduce its record: {why or 'its training is another run'}")
    print(f"{where}\n"
          f"its first {EARLY_EPOCHS} epochs: {verdict['history']:.2f} seed sds from its record (root mean square; "
          f"the limit {HISTORY_LIMIT})\n"
          f"each number: at most {verdict['worst']:.2f} seed sds (the limit {verdict['limit']:.2f} for "
          f"{verdict['judged']} numbers); the measures {verdict['measures']:.2f} (root mean square)")
    closest = sorted((row for row in verdict["rows"] if row[3] is not None), key=lambda row: -row[3])
    print_numbers("the closest to their limit", [row[0] for row in closest[:5]], old_numbers, new_numbers, spread)
    print_numbers("every number", list(old_numbers), old_numbers, new_numbers, spread)
    return 0 if verdict["agrees"] else 1


def verify_trials(records, again):
    """[(what, the run, judge's verdict)] of --verify's criterion on the records' pairs, no training
    needed: each run of `again` (trained and measured again elsewhere, samples/verify/) and the
    shipped model (2 threads) as mix-and-match-seed0 (1 thread) should agree; under each of those
    runs' names, every other record of its decoder (its family's other seeds, other conditionings,
    alphas, fixes), and the run again with one measure moved by MOVED seed sds more from its record,
    should not."""
    same = [(run, run, numbers(records[run]), numbers(new)) for run, new in sorted(again.items()) if run in records]
    if {"shipped", "mix-and-match-seed0"} <= set(records):  # the same seed, run and measurements on 2 threads
        same.append((SHIPPED_AS_SEED0, "mix-and-match-seed0", numbers(records["mix-and-match-seed0"]),
                     numbers(records["shipped"])))
    trials = []
    for label, run, old, new in same:
        spread = seed_spreads(run, records)
        common = {name: value for name, value in old.items() if name in new}
        trials.append(("the same run", label, judge(common, new, spread)))
        decoder = decoder_in(records[run])
        for other, record in sorted(records.items()):
            if other == run or {run, other} == {"shipped", "mix-and-match-seed0"} or decoder_in(record) != decoder:
                continue  # the run itself, or the shipped model and mix-and-match-seed0: one run
            theirs = numbers(record)
            what = "another seed" if family(other) and family(other) == family(run) else "another run"
            trials.append((what, run, judge({n: v for n, v in common.items() if n in theirs}, theirs, spread)))
        for name, value in common.items():
            if not name.startswith("epoch ") and spread.get(name) and is_number(new.get(name)):
                away = 1 if new[name] >= value else -1  # from the record, by MOVED sds at the least
                moved = {**new, name: new[name] + away * MOVED * spread[name]}
                trials.append((f"one measure moved by {MOVED:g} seed sds", run, judge(common, moved, spread)))
    return trials


SHIPPED_AS_SEED0 = "shipped, as mix-and-match-seed0"  # the trial of the shipped model against seed 0's record
MOVED = 6  # a measure moved by hand, in seed sds: beyond any count's limit (4.3 for 500 numbers)


def describe(record):
    return f"{record['cpu']} ({record['cpu_capability']}, " + ", ".join(
        f"{key} {record[key]}" for key in VERSIONS if key in record) + ")"


def relative(a, b):
    if not (is_number(a) and is_number(b)):
        return float("inf")
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def print_numbers(title, names, old, new, spread):
    if not names:
        return
    print(f"\n{title}:\n{'number':<44} {'record':>11} {'now':>11} {'seed sd':>9} {'seed sds':>9}")
    for name in names:
        value, now, sd = old.get(name), new.get(name), spread.get(name)
        sds = (f"{abs(now - value) / sd:.2f}" if sd else "equal" if value == now else "differs") \
            if is_number(value) and is_number(now) and sd is not None else ""
        print(f"{name:<44} {cell(value):>11} {cell(now):>11} {'' if sd is None else f'{sd:.4f}':>9} {sds:>9}")


def cell(value):
    return "n/a" if value is None else f"{value:d}" if isinstance(value, int) else f"{value:.3f}"


if __name__ == "__main__":
    main()

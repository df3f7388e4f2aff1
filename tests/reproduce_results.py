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

Its parts, in order: the command (main) and its local workers (reproduce, progress); --verify
(verify, compare). The rest are parts of their own, each importing only those below it: the
cluster's job array (tests/reproduce_slurm.py); the documents' tables and figures
(tests/reproduce_documents.py); one chain of runs trained, measured and recorded
(tests/reproduce_runs.py); and, imported by all of them, what the reproduction is: its plan, its
records and --verify's criterion (tests/reproduce_plan.py).
"""
import argparse
import os
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import reproduce_documents  # DOCUMENT_ROOT read when used: a test writes its documents elsewhere
from reproduce_plan import (
    EARLY_EPOCHS,
    HISTORY_LIMIT,
    RECORDS,
    REPO,
    SECTIONS,
    SEEDS,
    VERSIONS,
    chain_measures,
    chains,
    decoder_in,
    decoder_of,
    is_number,
    judge,
    numbers,
    plan,
    read_records,
    recorded,
    seed_spreads,
)
from reproduce_runs import (
    do_chain,
    end_with_scripts,
    ensure_trained,
    format_seconds,
    measure,
    write_record,
)
from utils import explain_os_error, given, mnist_dataset, positive_int, save_json, writable_dir

# an epoch of each decoder against the MLP's (README, "Speed": tests/bench_train.py --decoders-only; the
# recurrent one fed its own rows), for the time left before a decoder has a record of its own
EPOCH_COST = {"mlp": 1.0, "autoregressive": 1.42, "recurrent": 5.06}
PLAN_AGAIN_SECONDS = 5  # how often an idle worker looks for runs that a running chain's records have added


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
            sys.exit(reproduce_documents.write_documents(args.records_dir, check=args.check))
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
            writable_dir(os.path.join(reproduce_documents.DOCUMENT_ROOT, "samples", "tables"), "the repository",
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


def plan_difference(args, records, run):
    """How the record of `run` differs from what the plan gives that name: train.py's flags, its
    epochs and the run it continues, and each measurement's sample.py flags; None where it does not
    (or where the plan has no such run)."""
    trainings, measures = plan(args, SECTIONS)
    record, differences = records[run], []
    if run in trainings and record["train"]:
        train = record["train"]
        as_recorded = (train["flags"], train["epochs"], train["continues"])
        if as_recorded != trainings[run]:
            differences.append("trained as (flags, epochs, the run it continues) {} where the plan gives {}".format(
                *(f"({shlex.join(flags)}, {epochs}, {continues})" for flags, epochs, continues in
                  (as_recorded, trainings[run]))))
    for m, (planned_run, flags) in chain_measures([run], measures).items():  # the flags whole, as measured
        measurement = record["measurements"].get(m)
        if measurement and (planned_run, flags) != (run, measurement["flags"]):
            differences.append(f"{m} measured with {shlex.join(measurement['flags'])} where the plan gives "
                               f"{shlex.join(flags)}")
    return "; ".join(differences) or None


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
    return reproduce_documents.write_documents(args.records_dir)


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
        value, now = reproduce_documents.cell(value), reproduce_documents.cell(now)
        print(f"{name:<44} {value:>11} {now:>11} {'' if sd is None else f'{sd:.4f}':>9} {sds:>9}")


if __name__ == "__main__":
    main()

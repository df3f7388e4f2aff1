"""
What the reproduction is (tests/reproduce_results.py; not a test): its plan, its records, and
--verify's criterion. The reproduction's other parts import this one and it imports none of them:
tests/reproduce_runs.py does one chain of runs, tests/reproduce_documents.py writes the documents
from the records, tests/reproduce_slurm.py runs the chains on a cluster, and
tests/reproduce_results.py is the command.

Its parts, in order: the plan (plan, chains, chain_measures) and its sections (training_runs,
measurements); the records (read_records, record_problem); the criterion of --verify on another
kind of machine (seed_spreads, judge, verify_trials).
"""
import contextlib
import glob
import json
import math
import os
import re
import statistics
import sys

from one_side_random import SIDES

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
# sample.py flags added to every measurement: none, the report's measures (the tests' tiny runs: fewer)
MEASURE_FLAGS = []


def plan(args, sections):
    """({run: (train.py flags, epochs, the run it continues or None)}, {measurement: (run, sample.py
    flags)}) of the sections, as far as the measurements so far decide it (the fixes' later runs)."""
    trainings, measures = {}, {}
    for section in sections:
        trainings.update(training_runs(section, args))
        measures.update(measurements(section, args))
    return trainings, measures


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


def chain_measures(chain, measures):
    """The measurements of a chain's runs, each with its sample.py flags whole (MEASURE_FLAGS added):
    all a worker, here or on a cluster, needs of the plan besides the trainings."""
    return {m: (run, [*flags, *MEASURE_FLAGS]) for m, (run, flags) in measures.items() if run in chain}


def decoder_of(name, trainings):
    """The decoder of a planned run (a continuation's is the one of the run it continues)."""
    flags, _, start = trainings[name]
    if start:
        return decoder_of(start, trainings)
    return flags[flags.index("--decoder") + 1] if "--decoder" in flags else "mlp"


# ----------------------------------------------------------------------------- the plan's sections

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


# ----------------------------------------------------------------------------- records

RECORD_KEYS = ("run", "train", "config", "history", "measurements", "commit", "torch", "cpu", "cpu_capability",
               "threads")
# what changes a number besides the code and the CPU: torch's kernels; torchvision (MNIST's decoding
# and the completion grids); numpy (the KL weight's exp); Python. The records before these fields
# name torch alone
VERSIONS = ("torch", "torchvision", "numpy", "python")


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


def metrics_json(measurement):
    """The measurement if it is a metrics JSON of sample.py's (a dict with its "metrics" and the
    accuracy of the classifier that judged them), else None."""
    return measurement if isinstance(measurement, dict) and isinstance(measurement.get("metrics"), dict) and \
        isinstance(measurement.get("classifier_accuracy"), float) else None


def read_json_file(path):
    """What the JSON file holds, or None where it is missing or broken."""
    with contextlib.suppress(OSError, ValueError), open(path, encoding="utf-8") as f:
        return json.load(f)
    return None


# ----------------------------------------------------------------------------- the criterion of --verify

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

"""
The documents of the reproduction (`tests/reproduce_results.py --tables`; not a test): every table
between the "<!-- table NAME -->" markers of README and the report, the matrices too wide for the
report (samples/tables/), and the figures (samples/*.png), written from the records alone. A table
of a section whose measurements are not all recorded is written as pending.
"""
import argparse
import contextlib
import itertools
import os
import re
import statistics
import sys

from one_side_random import SIDES
from reproduce_plan import (
    ALWAYS_FORCED,
    CONDITIONINGS,
    DECODERS,
    EARLY_EPOCHS,
    EPOCHS,
    EXPRESSIVE,
    FALSE_ALARM,
    FIXES,
    HISTORY_LIMIT,
    LONG_EPOCHS,
    MODES,
    RECORDS,
    RECURRENT,
    REPO,
    REPORT_ORDER,
    REPORT_TEMPERATURES,
    SECTIONS,
    SEEDS,
    SHIPPED_AS_SEED0,
    TEMPERATURES,
    TEST_ALPHA_TEMPERATURES,
    TEST_ALPHAS,
    TRAIN_ALPHAS,
    VERSIONS,
    better_fixes,
    chains,
    fix_prefix,
    fixes_pairs,
    fixes_rows,
    measurements,
    measurements_of,
    number_limit,
    picked_values,
    plan,
    read_records,
    verify_trials,
)
from utils import plot_history, save_figure, write_all

# the documents whose tables are written from the records, between "<!-- table NAME -->" and
# "<!-- /table -->" lines
DOCUMENTS = ("README.md", os.path.join("samples", "README.md"))
DOCUMENT_ROOT = REPO  # where DOCUMENTS and samples/ are (the tests' hand-made ones elsewhere)
TABLE = re.compile(r"(<!-- table (\S+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)


def tables(records_dir, verified=None):
    """{table name: (the sections it needs, function(metrics, records) -> markdown)}: the tables
    between the documents' markers, of the records in records_dir; verified: verification's."""
    verified = verified or verification(records_dir)
    return {
        "found": (("latent-use", "recurrent", "fixes"), lambda m, r: found_table(m)),
        "provenance": ((), lambda m, r: provenance(r, records_dir)),
        "seeds": (("results",), lambda m, r: seed_table(m)),
        "frontier": (("results",), lambda m, r: frontier_table(m)),
        "latent-use": (("latent-use",), lambda m, r: latent_table(m, latent_columns())),
        "latent-use-long": (("latent-use",), lambda m, r: long_table(m, "ar-")),
        "recurrent": (("recurrent",), lambda m, r: latent_table(m, recurrent_columns())),
        "recurrent-long": (("recurrent",), lambda m, r: long_table(m, RECURRENT[0])),
        "fixes": (("fixes",), lambda m, r: fixes_tables(m)[0]),
        "fixes-sweep": (("fixes",), lambda m, r: fixes_tables(m)[1]),
        "mechanism": (("mechanism",), lambda m, r: mechanism_tables(m)[0]),
        "verify": ((), lambda m, r: verified(r)[0]),
        "cluster": (SECTIONS, lambda m, r: cluster_table(r, records_dir)),
    }


def table_files(records_dir=RECORDS, verified=None):
    """{file under samples/: (its sections, function(metrics, records) -> markdown)}: the matrices
    too wide for the report, each a file of its own that the report links, of the records in records_dir."""
    verified = verified or verification(records_dir)
    return {
        os.path.join("tables", "seed_differences.md"): (("results",), lambda m, r: differences_table(m)),
        os.path.join("tables", "frontier.md"): (("results",), lambda m, r: frontier_table(m, full=True)),
        os.path.join("tables", "latent_use_differences.md"): (
            ("latent-use",), lambda m, r: latent_differences_table(m, latent_pairs())),
        os.path.join("tables", "recurrent_differences.md"): (
            ("recurrent",), lambda m, r: latent_differences_table(m, recurrent_pairs())),
        os.path.join("tables", "fixes_differences.md"): (("fixes",), lambda m, r: fixes_tables(m)[2]),
        os.path.join("tables", "mechanism_differences.md"): (("mechanism",), lambda m, r: mechanism_tables(m)[1]),
        os.path.join("tables", "verify.md"): ((), lambda m, r: verified(r)[1]),
    }


def verification(records_dir):
    """verify_tables of the records in records_dir, made once: the report's table and
    tables/verify.md share its trials, a second or so of judging."""
    made = []

    def of(records):
        if not made:
            made.append(verify_tables(records, records_dir))
        return made[0]
    return of


def figures():
    """{file under samples/: (its section, function(metrics, records, path))}."""
    def curves(runs):
        return lambda m, r, path: plot_history({label: r[run]["history"] for label, run in runs.items()}, path)
    return {
        "frontier.png": ("results", lambda m, r, path: plot_frontier(m, path)),
        "kl_curves.png": ("results", curves({mode: f"{mode}-seed0" for mode in MODES})),
        **{f"kl_{decoder}.png": (section, curves({f"{decoder}, {mode}": f"{prefix}{mode}-seed0-long"
                                                  for mode in CONDITIONINGS}))
           for section, decoder, prefix in (("latent-use", "autoregressive", "ar-"),
                                            ("recurrent", "recurrent", RECURRENT[0]))},
    }


def write_documents(records_dir, check=False):
    """Write every table of DOCUMENTS, every file of table_files() and every figure from the records
    alone; a table, file or figure of a section whose measurements are not all recorded is written
    as pending, and its section named in one line. With check, write nothing and return 1 if a
    document or file differs from what the records give. Returns the exit code."""
    records = read_records(records_dir)
    metrics = measurements_of(records)
    scratch = argparse.Namespace(records_dir=records_dir)
    missing = {section: [m for m in measurements(section, scratch) if m not in metrics] for section in SECTIONS}
    for section, names in missing.items():
        if names:
            print(f"section {section}: {len(names)} measurements not recorded yet ({', '.join(names[:3])}"
                  f"{', ...' if len(names) > 3 else ''}): its tables and figures are pending")

    def body(sections, make):
        waiting = [section for section in sections if missing[section]]
        try:
            return pending(waiting, missing) if waiting else make(metrics, records)
        except KeyError as e:  # a record of the plan's run without a measure (or a field) its table reads
            sys.exit(f"error: a table of section {', '.join(sections) or 'provenance'} reads {e} where the records in "
                     f"{records_dir} have none: restore them with git checkout, or delete the run's record to measure "
                     f"it again")
    verified = verification(records_dir)
    known, written = tables(records_dir, verified), {}
    for document in DOCUMENTS:
        text = read_text(os.path.join(DOCUMENT_ROOT, document))
        if text is None:
            sys.exit(f"error: {document} is missing: restore it with git checkout {document}")
        unpaired = unpaired_marker(text)
        if unpaired:
            sys.exit(f"error: {document}, line {unpaired}: a table marker without its pair (each '<!-- table NAME -->' "
                     f"line is closed by a '<!-- /table -->' line before the next table): restore the marker, or git "
                     f"checkout {document}")
        unknown = [name for _, name, _, _ in TABLE.findall(text) if name not in known]
        if unknown:
            sys.exit(f"error: {document} has a table marker of no table of this reproduction: {', '.join(unknown)}")
        written[document] = TABLE.sub(lambda match: f"{match[1]}{body(*known[match[2]])}\n{match[4]}", text)
    for name, (sections, make) in table_files(records_dir, verified).items():
        written[os.path.join("samples", name)] = f"{body(sections, make)}\n"
    differing = [path for path, text in written.items() if read_text(os.path.join(DOCUMENT_ROOT, path)) != text]
    if check:
        for path in differing:
            print(f"{path}: its tables differ from what the records give; run "
                  f"`python3 tests/reproduce_results.py --tables` and commit the result")
        return 1 if differing else 0
    # all or nothing: a folder where a table file belongs, a full disk, leave every document as it was
    write_all({os.path.join(DOCUMENT_ROOT, path): lambda f, text=written[path]: f.write(text.encode())
               for path in differing})
    for name, (section, draw) in figures().items():
        if not missing[section]:
            draw(metrics, records, os.path.join(DOCUMENT_ROOT, "samples", name))
    print(f"wrote the tables of {', '.join(DOCUMENTS)} and samples/tables/, and the figures of the complete "
          f"sections under samples/")
    return 0


def unpaired_marker(text):
    """The line number of the first table marker that is not paired (an opening one whose closing
    line is missing, a closing one with no opening one), or None: TABLE alone would run to the next
    table's end and take the text between them for the table."""
    open_at = None
    for number, line in enumerate(text.splitlines(), 1):
        if re.fullmatch(r"<!-- table \S+ -->", line):
            if open_at is not None:
                return open_at
            open_at = number
        elif line == "<!-- /table -->":
            if open_at is None:
                return number
            open_at = None
    return open_at


def read_text(path):
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
        return f.read()
    return None


def pending(sections, missing):
    counts = ", ".join(f"{len(missing[section])} of section {section}" for section in sections)
    return (f"*Pending: measurements not recorded yet ({counts}); `python3 tests/reproduce_results.py --data-root "
            f"DATA` continues the reproduction.*")


def provenance(records, records_dir):
    """Where the records come from, in a few lines: runs, commits, torch, CPUs and threads, the digit
    classifier's accuracy in each measurement (one value: one judge), and the core-hours of each
    section (training and measuring, times the threads each used)."""
    if not records:
        return "*No run is recorded yet.*"
    def tally(values):
        return ", ".join(f"{value} ({values.count(value)})" for value in sorted(set(values), key=str))
    def counted(key):
        return tally([record[key][:7] + record[key][40:] if key == "commit" and record[key] else
                      record.get(key, "not named")  # torchvision, numpy, Python: not in the records before them
                      for record in records.values()])  # a commit's short name, and "+uncommitted" if it says so
    judges = tally([f"{m['metrics']['classifier_accuracy']:.2%}" for record in records.values()
                    for m in record["measurements"].values()])
    hours, counted_runs = [], set()
    for section in REPORT_ORDER:  # a run shared by two sections counts in the first
        runs = {run for run, _ in measurements(section, argparse.Namespace(records_dir=records_dir)).values()}
        seconds = sum(core_seconds(records[run]) for run in runs - counted_runs if run in records)
        counted_runs |= runs
        hours.append(f"{section} {seconds / 3600:.1f}")
    return (f"{len(records)} runs recorded. Commits (runs): {counted('commit')}. "
            + " ".join(f"{key}: {counted(key)}." for key in VERSIONS) + " "
            f"CPUs: {counted('cpu')}, instruction set {counted('cpu_capability')}, threads per run "
            f"{counted('threads')}. The digit classifier's test accuracy (measurements): {judges}. Core-hours "
            f"recorded, training and measuring (a run shared by two sections in the first): {', '.join(hours)}.")


# ----------------------------------------------------------------------------- tables

def seed_values(metrics, mode, key):
    return [metrics[f"{mode}-seed{seed}-T1"]["metrics"][key]["model"] for seed in SEEDS]


def mean_sd(values):
    """Mean and sample standard deviation (n - 1) over the seeds."""
    return statistics.mean(values), statistics.stdev(values)


def mean_sd_cell(values, digits=3):
    """'mean ± sd', or 'n/a' for a measure the conditioning does not have (diversity from the
    Sampling alone where I never changes)."""
    return "n/a" if None in values else "{0:.{2}f} ± {1:.{2}f}".format(*mean_sd(values), digits)


def difference(metrics, key, a, b):
    """a's mean minus b's over the seeds, twice the larger of their sds, and whether the difference
    is the larger (the only differences README reads as findings); None where a measure is n/a."""
    values_a, values_b = seed_values(metrics, a, key), seed_values(metrics, b, key)
    if None in values_a or None in values_b:
        return None
    (mean_a, sd_a), (mean_b, sd_b) = mean_sd(values_a), mean_sd(values_b)
    return mean_a - mean_b, 2 * max(sd_a, sd_b), abs(mean_a - mean_b) > 2 * max(sd_a, sd_b)


def seed_table(metrics):
    """README's Results table: each metric of sample.py --metrics as mean ± sd over the seeds, per
    mode; the real tops' value (the same for every run: one classifier, one test set); and the
    shipped checkpoint's value as `sample.py --metrics` prints it."""
    shipped = metrics["shipped-T1"]["metrics"]
    lines = [f"| metric (per test image), mean ± sd over seeds {', '.join(map(str, SEEDS))} | "
             + " | ".join(MODES) + " | real top | shipped model (seed 0) |", "|---|" + "---:|" * (len(MODES) + 2)]
    for key, row in shipped.items():
        cells = [mean_sd_cell(seed_values(metrics, mode, key)) for mode in MODES]
        lines.append(f"| {markdown(row['name'])} | " + " | ".join(cells)
                     + f" | {blank_or(row['real_top'])} | {cell(row['model'])} |")
    return "\n".join(lines)


def differences_table(metrics):
    """Each difference between modes beside twice the larger of the two seed spreads (sd); 'yes'
    where the difference is the larger, the only differences README reads as findings."""
    pairs = [("mix-and-match", "fixed"), ("curriculum", "mix-and-match")]
    lines = ["| metric | " + " | ".join(f"{a} − {b} | 2 × sd | beyond?" for a, b in pairs) + " |",
             "|---|" + "---:|---:|:---:|" * len(pairs)]
    for key, row in metrics[f"mix-and-match-seed{SEEDS[0]}-T1"]["metrics"].items():
        cells = ["n/a | | " if d is None else f"{d[0]:+.3f} | {d[1]:.3f} | {'yes' if d[2] else 'no'}"
                 for d in (difference(metrics, key, a, b) for a, b in pairs)]
        lines.append(f"| {markdown(row['name'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# the measures of latent use, and what it costs or buys (README, "Does Mix-and-Match keep the latent in use?")
LATENT_KEYS = ("kl", "active_units", "diversity_z", "diversity_sampling", "diversity", "iw_nll", "neg_elbo",
               "best_of_k", "mm_best_of_k", "precision", "density", "coverage", "frechet", "confidence",
               "distinct_digits")
# README's table of fixes: the latent in use, the fit, fidelity and coverage against real digits
FIXES_KEYS = ("kl", "active_units", "diversity_z", "diversity", "iw_nll", "precision", "coverage", "frechet")
# section "mechanism": where the Sampling is redrawn (row label, run-name part), and what it changes
MECHANISM_ROWS = (("redrawn on both sides (mix-and-match)", "mix-and-match"),
                  *((f"redrawn on the {side} side only", f"random-{side}") for side in SIDES),
                  ("redrawn on neither (fixed)", "fixed"))
MECHANISM_KEYS = ("kl", "active_units", "diversity_z", "diversity_sampling", "iw_nll", "coverage", "frechet")


# short column headers, for tables of one column per measure
SHORT = {"kl": "KL (nats)", "active_units": "active units", "diversity_z": "z alone", "diversity_sampling":
         "Sampling alone", "diversity": "diversity", "iw_nll": "IW NLL (nats)", "precision": "precision",
         "coverage": "coverage", "frechet": "Fréchet"}
FOUND_KEYS = ("kl", "diversity_z", "diversity_sampling", "diversity", "iw_nll", "coverage", "frechet")


def found_table(metrics):
    """README's table: per decoder, the three conditionings and concat with the fix that won
    (section "fixes"), each measure of FOUND_KEYS as mean ± sd over the seeds."""
    better = better_fixes(metrics, picks := picked_values(metrics))
    rows = []
    for decoder, prefix in (("MLP", ""), ("autoregressive", "ar-"), ("recurrent", RECURRENT[0])):
        rows += [(f"{decoder}, {mode}", f"{prefix}{mode}") for mode in CONDITIONINGS]
        if prefix in better:
            fix = better[prefix]
            rows.append((f"{decoder}, concat + {fix} {picks[prefix, fix]:g}",
                         fix_prefix(prefix, FIXES[fix][1], picks[prefix, fix])))
    return methods_table(metrics, rows, FOUND_KEYS, digits=2, title="decoder, conditioning")


def latent_columns():
    """(column label, run-name prefix) of each decoder and conditioning."""
    return [(f"{'MLP' if decoder == 'mlp' else decoder}, {mode}", f"{prefix}{mode}")
            for decoder, (prefix, _) in DECODERS.items() for mode in CONDITIONINGS]


def latent_pairs():
    """Mix-and-Match against each deterministic conditioning with the same decoder, and each
    conditioning's autoregressive decoder against its MLP one."""
    pairs = [("ar-mix-and-match", f"ar-{mode}") for mode in CONDITIONINGS if mode != "mix-and-match"]
    pairs += [("mix-and-match", mode) for mode in CONDITIONINGS if mode != "mix-and-match"]
    return pairs + [(f"ar-{mode}", mode) for mode in CONDITIONINGS]


def recurrent_columns():
    columns = [(f"recurrent, {mode}", f"{RECURRENT[0]}{mode}") for mode in CONDITIONINGS]
    prefix, _, modes = ALWAYS_FORCED
    return columns + [(f"recurrent always teacher-forced, {mode}", f"{prefix}{mode}") for mode in modes]


def recurrent_pairs():
    """Mix-and-Match against each deterministic conditioning, with and without the schedule; and
    the schedule against teacher forcing throughout."""
    return [("rnn-mix-and-match", "rnn-fixed"), ("rnn-mix-and-match", "rnn-concat"),
            ("rnn-tf-mix-and-match", "rnn-tf-fixed"), ("rnn-mix-and-match", "rnn-tf-mix-and-match"),
            ("rnn-fixed", "rnn-tf-fixed")]


def latent_table(metrics, columns):
    """Each latent-use measure as mean ± sd over the seeds, per column (label, run-name prefix)."""
    names = next(iter(metrics.values()))["metrics"]
    lines = [f"| metric (per test image), mean ± sd over seeds {', '.join(map(str, SEEDS))} | "
             + " | ".join(label for label, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for key in LATENT_KEYS:
        cells = [mean_sd_cell(seed_values(metrics, prefix, key)) for _, prefix in columns]
        lines.append(f"| {markdown(names[key]['name'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latent_differences_table(metrics, pairs, keys=LATENT_KEYS):
    """For each pair (a, b) of run-name prefixes: a − b (twice the larger seed sd, and ", yes" where
    the difference is beyond it), for each measure of keys."""
    names = next(iter(metrics.values()))["metrics"]
    labels = [f"{run_label(a)} − {run_label(b)}" for a, b in pairs]
    lines = ["| metric: a − b (2 × sd) | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(pairs)]
    for key in keys:
        cells = ["n/a" if d is None else f"{d[0]:+.3f} ({d[1]:.3f}{', yes' * d[2]})"
                 for d in (difference(metrics, key, a, b) for a, b in pairs)]
        lines.append(f"| {markdown(names[key]['name'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fixes_tables(metrics):
    """README's tables of fixes: each method over the seeds, the seed-0 sweep, and the differences."""
    picks = picked_values(metrics)
    better = better_fixes(metrics, picks)
    return [methods_table(metrics, fixes_rows(picks, better)), sweep_table(metrics),
            latent_differences_table(metrics, fixes_pairs(picks, better), FIXES_KEYS)]


def methods_table(metrics, rows, keys=FIXES_KEYS, digits=3, title="method"):
    """One row per method (label, run-name prefix), one column per measure of keys, each as mean ±
    sd over the seeds."""
    lines = [f"| {title}, mean ± sd over seeds {', '.join(map(str, SEEDS))} | "
             + " | ".join(SHORT[key] for key in keys) + " |", "|---|" + "---:|" * len(keys)]
    for label, prefix in rows:
        lines.append(f"| {label} | " + " | ".join(mean_sd_cell(seed_values(metrics, prefix, key), digits)
                                                 for key in keys) + " |")
    return "\n".join(lines)


def mechanism_tables(metrics):
    """README's table of section "mechanism": per expressive decoder, the Sampling redrawn on both
    sides (mix-and-match), the decoder's only, the encoder's only, and neither (fixed); and each
    one-side variant against both ends."""
    rows, pairs = [], []
    for decoder, (prefix, _) in EXPRESSIVE.items():
        rows += [(f"{decoder}, {label}", f"{prefix}{run}") for label, run in MECHANISM_ROWS]
        pairs += [(f"{prefix}random-{side}", f"{prefix}{mode}") for side in SIDES
                  for mode in ("mix-and-match", "fixed")]
    return [methods_table(metrics, rows, MECHANISM_KEYS), latent_differences_table(metrics, pairs, MECHANISM_KEYS)]


def sweep_table(metrics):
    """The fixes' seed-0 sweep: one row per decoder, fix and value, beside the plain concat's seed 0."""
    lines = ["| seed 0, concat | " + " | ".join(SHORT[key] for key in FIXES_KEYS) + " |",
             "|---|" + "---:|" * len(FIXES_KEYS)]
    for decoder, (prefix, _) in EXPRESSIVE.items():
        rows = [(f"{decoder}, no fix", f"{prefix}concat")]
        rows += [(f"{decoder}, {fix} {value:g}", fix_prefix(prefix, tag, value))
                 for fix, (_, tag, values) in FIXES.items() for value in values]
        for label, run in rows:
            values = [metrics[f"{run}-seed0-T1"]["metrics"][key]["model"] for key in FIXES_KEYS]
            lines.append(f"| {label} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def verify_tables(records, records_dir):
    """The report's table of --verify's criterion on the records' pairs (verify_trials), and one line
    per run trained and measured again on another machine (the runs of samples/verify/, beside the
    records' folder)."""
    again = read_records(again_folder(records_dir))
    trials = verify_trials(records, again)
    if not trials:
        return "*No run is trained and measured again yet.*", "*No run is trained and measured again yet.*\n"
    kinds = {}
    for what, _, verdict in trials:
        kinds.setdefault(what, []).append(verdict)

    def span(values):
        return f"{min(values):.2f} to {max(values):.2f}"
    lines = ["| a run's record against | pairs | judged to reproduce | history (seed sds) | most seed sds |",
             "|---|---:|---:|---:|---:|"]
    for what, verdicts in kinds.items():
        label = {"the same run": "the same run, trained and measured again",
                 "another seed": "another seed of its family, under its name",
                 "another run": "another run of its decoder, under its name"}.get(what, what)
        lines.append(f"| {label} | {len(verdicts)} | {sum(v['agrees'] for v in verdicts)} | "
                     f"{span([v['history'] for v in verdicts])} | {span([v['worst'] for v in verdicts])} |")
    same = kinds.get("the same run", [])
    others = [v for what, verdicts in kinds.items() if what != "the same run" for v in verdicts]
    counts = sorted(v["judged"] for v in same) or [1]

    def rate(errors, pairs):  # with none seen, the rule of three's 95% bound
        return f"{errors} in {pairs}" + (f", a rate below {3 / pairs:.3f} (95%)" if not errors and pairs else "")
    lines.append(f"\nThe limits: the first {EARLY_EPOCHS} epochs within {HISTORY_LIMIT} seed sds (root mean square); "
                 f"each number within {number_limit(counts[0]):.2f} to {number_limit(counts[-1]):.2f} seed sds, for "
                 f"the {counts[0]} to {counts[-1]} numbers of these runs (a chance of {FALSE_ALARM} shared out over "
                 f"them). False alarms: {rate(sum(not v['agrees'] for v in same), len(same))}; misses: "
                 f"{rate(sum(v['agrees'] for v in others), len(others))}.")
    runs = ["| run | measured again on | numbers | history | measures | most seed sds (limit) | verdict |",
            "|---|---|---:|---:|---:|---:|---|"]
    for what, run, verdict in trials:
        if what == "the same run":
            where = ("the same CPU, 2 threads" if run == SHIPPED_AS_SEED0 else
                     f"{again[run]['cpu']}, {again[run]['threads']} thread(s)")
            runs.append(f"| {run} | {where} | {verdict['judged']} | {verdict['history']:.2f} | "
                        f"{verdict['measures']:.2f} | {verdict['worst']:.2f} ({verdict['limit']:.2f}) | "
                        f"{'reproduces' if verdict['agrees'] else 'does not'} |")
    return "\n".join(lines), "\n".join(runs) + "\n"


def cluster_table(records, records_dir):
    """What --submit sends, per section and for the whole reproduction: its tasks (chains), the
    minutes of its longest and its median task, and its core-hours, from the records' seconds."""
    scratch = argparse.Namespace(records_dir=records_dir)
    lines = ["| section | tasks | longest task (min) | median task (min) | core-hours |", "|---|---:|---:|---:|---:|"]
    for label, sections in [*((section, [section]) for section in REPORT_ORDER), ("all, once each", SECTIONS)]:
        times = [sum(core_seconds(records[run]) for run in chain) / 60 for chain in chains(*plan(scratch, sections))]
        lines.append(f"| {label} | {len(times)} | {max(times):.0f} | {statistics.median(times):.0f} | "
                     f"{sum(times) / 60:.1f} |")
    return "\n".join(lines)


def core_seconds(record):
    """The seconds a run took to train and measure, times the threads it used."""
    return record["threads"] * ((record["train"] or {}).get("seconds", 0) + sum(
        m["seconds"] or 0 for m in record["measurements"].values()))


def again_folder(records_dir):
    """Where the runs trained and measured again by --verify on other machines are kept: verify/
    beside the records' folder (samples/verify/)."""
    return os.path.join(os.path.dirname(records_dir), "verify")


def blank_or(value):
    """A table cell: the value to 3 decimals, blank where there is none (off a curve, no reference)."""
    return "" if value is None else f"{value:.3f}"


def run_label(prefix):
    """A run-name prefix as a table reads it: "rnn-tf-fixed" -> "recurrent always teacher-forced fixed",
    "fixed" -> "MLP fixed"."""
    for flag, tag, _ in FIXES.values():  # "ar-concat-fb0.25" -> "autoregressive concat --free-bits 0.25"
        if f"-{tag}" in prefix:
            run, value = prefix.rsplit(f"-{tag}", 1)
            return f"{run_label(run)} {flag} {value}"
    for short, long in (("rnn-tf-", "recurrent always teacher-forced "), ("rnn-", "recurrent "),
                        ("ar-", "autoregressive ")):
        if prefix.startswith(short):
            return long + prefix.removeprefix(short)
    return f"MLP {prefix}"


def long_table(metrics, prefix):
    """The seed-0 runs of a decoder (run-name prefix) at EPOCHS and at LONG_EPOCHS."""
    names = next(iter(metrics.values()))["metrics"]
    columns = [(f"{mode}, epoch {epochs}", f"{prefix}{mode}-seed0{suffix}-T1") for mode in CONDITIONINGS
               for epochs, suffix in [(EPOCHS, ""), (LONG_EPOCHS, "-long")]]
    lines = [f"| {run_label(prefix)}decoder, seed 0 | " + " | ".join(label for label, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for key in LATENT_KEYS:
        values = [metrics[name]["metrics"][key]["model"] for _, name in columns]
        lines.append(f"| {markdown(names[key]['name'])} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def markdown(text):
    return text.replace("|", "\\|")  # a bare | would end the table cell


def point(measurement, x="distinct_digits", y="confidence"):
    return measurement["metrics"][x]["model"], measurement["metrics"][y]["model"]


def fidelity_key(metrics):
    """Which fidelity measure is the frontier's quality axis: precision or density, whichever varies
    less between the seeds at T = 1 (its sd over its mean, averaged over the conditionings)."""
    def relative_spread(key):
        return statistics.mean(sd / mean for mean, sd in (mean_sd(seed_values(metrics, mode, key)) for mode in MODES))
    return min(("precision", "density"), key=relative_spread)


def frontier_table(metrics, full=False):
    """The frontier's points (seed 0): temperature curves, test-time alphas and trained alphas, with
    their fidelity, confidence and coverage, beside the fidelity (and, full, the confidence) each
    conditioning's temperature curve has at the same diversity (linear between its temperatures;
    distinct digits grow with T along every curve). The report's (not full) has the temperatures
    of REPORT_TEMPERATURES only."""
    fidelity = fidelity_key(metrics)
    curves = {(mode, y): [point(metrics[f"{mode}-seed0-T{t:g}"], y=y) for t in TEMPERATURES]
              for y in (fidelity, "confidence")[:2 if full else 1] for mode in ("fixed", "mix-and-match")}
    header = (f"| model (seed 0) | T | distinct digits | mean distance | {fidelity} | confidence | coverage | "
              + " | ".join(f"{mode}'s {y} at these digits" for mode, y in curves) + " |")
    lines = [header, "|---|" + "---:|" * (6 + len(curves))]
    keys = ("distinct_digits", "diversity", fidelity, "confidence", "coverage")  # the columns after T
    for name in frontier_points():
        m = metrics[name]
        if not full and "-seed0-T" in name and m["temperature"] not in REPORT_TEMPERATURES:
            continue
        label = name.rsplit("-T", 1)[0].replace("-seed0", "").replace("testalpha", "test-time alpha ")
        values = [m["metrics"][key]["model"] for key in keys]
        on_curves = [on_curve(curve, values[0]) for curve in curves.values()]
        cells = [f"{v:.3f}" for v in values] + [blank_or(v) for v in on_curves]
        lines.append(f"| {label} | {m['temperature']:g} | " + " | ".join(cells) + " |")
    # the true tops in the completions' place: where a line would be if it were real digits
    real = [blank_or(metrics[frontier_points()[0]]["metrics"][key]["real_top"]) for key in keys]
    lines.append("| real digits (the true tops) |  | " + " | ".join(real + [""] * len(curves)) + " |")
    return "\n".join(lines)



def frontier_points():
    """The measurements of the frontier, each conditioning's temperatures in order, then alphas."""
    names = [f"{mode}-seed0-T{t:g}" for mode in MODES for t in TEMPERATURES]
    names += [f"mix-and-match-seed0-testalpha{a}-T{t:g}" for a in TEST_ALPHAS for t in TEST_ALPHA_TEMPERATURES]
    return names + [f"{mode}-alpha{a}-T1" for mode in ("mix-and-match", "fixed") for a in TRAIN_ALPHAS]


def on_curve(curve, x):
    """The y of a curve of (x, y) points at x, linear between neighbouring points; None outside
    the x the curve spans."""
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if min(x0, x1) <= x <= max(x0, x1):
            return y0 if x0 == x1 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


# ----------------------------------------------------------------------------- figure

def plot_frontier(metrics, path):
    """Quality against diversity (distinct digits), one line per conditioning through its
    temperatures (seed 0), the seed spread at T = 1 as error bars (mean ± sd), trained and
    test-time alphas as labelled points, the real digits' value as a reference line. Three
    panels, three qualities: fidelity against real digits (precision or density, fidelity_key),
    the classifier's confidence, and coverage of the real digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fidelity = fidelity_key(metrics)
    panels = [(fidelity, f"fidelity: {fidelity} against real test digits"),
              ("confidence", "classifier confidence"), ("coverage", "coverage of the real test digits (k = 5)")]
    colors = dict(zip(MODES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), gridspec_kw={
        "left": 0.05, "right": 0.99, "bottom": 0.24, "top": 0.9, "wspace": 0.22})
    x_key = "distinct_digits"
    for ax, (y_key, y_label) in zip(axes, panels):
        for mode, color in colors.items():
            curve = [point(metrics[f"{mode}-seed0-T{t:g}"], x_key, y_key) for t in TEMPERATURES]
            ax.plot(*zip(*curve), color=color, marker="o", markersize=3.5, label=f"{mode}: T = "
                    f"{', '.join(f'{t:g}' for t in TEMPERATURES)}")
            for t, (x, y) in zip(TEMPERATURES, curve):
                if t in (TEMPERATURES[0], 1.0, TEMPERATURES[-1]):
                    ax.annotate(f"T {t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
            (x_mean, x_sd), (y_mean, y_sd) = (mean_sd(seed_values(metrics, mode, key)) for key in (x_key, y_key))
            ax.errorbar(x_mean, y_mean, xerr=x_sd, yerr=y_sd, color=color, capsize=3, linewidth=1.2,
                        label=f"{mode}: seeds {', '.join(map(str, SEEDS))} at T = 1, mean ± sd")
            for alpha in TRAIN_ALPHAS if mode != "curriculum" else ():
                x, y = point(metrics[f"{mode}-alpha{alpha}-T1"], x_key, y_key)
                ax.plot(x, y, marker="s", color=color, markersize=5, markerfacecolor="white")
                ax.annotate(f"α {alpha}", (x, y), textcoords="offset points", xytext=(4, -9), fontsize=7, color=color)
        for alpha in TEST_ALPHAS:
            for t in TEST_ALPHA_TEMPERATURES:
                x, y = point(metrics[f"mix-and-match-seed0-testalpha{alpha}-T{t:g}"], x_key, y_key)
                ax.plot(x, y, marker="^", color=colors["mix-and-match"], markersize=6, markerfacecolor="white")
                ax.annotate(f"test α {alpha}, T {t:g}", (x, y), textcoords="offset points", xytext=(4, 3),
                            fontsize=7, color=colors["mix-and-match"])
        real = metrics[f"mix-and-match-seed{SEEDS[0]}-T1"]["metrics"][y_key]["real_top"]
        ax.axhline(real, color="grey", linestyle="--", linewidth=1, label=f"real digits: {real:.3f}")
        ax.set(xlabel="diversity: distinct digits among the 18 completions", ylabel=y_label)
        ax.grid(alpha=0.3)
    axes[0].plot([], [], "ks", markerfacecolor="white", label="trained with another alpha (T = 1)")
    axes[0].plot([], [], "k^", markerfacecolor="white", label="default model, test-time alpha")
    fig.suptitle("Quality against diversity (seed 0 along each line; up and right is better; dashed: real digits "
                 "in the completions' place)")
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(1.7, -0.13), ncol=4, frameon=False)
    save_figure(fig, path, dpi=100)


def cell(value):
    """A number as the tables (and --verify's printout) write it: n/a where it has none."""
    return "n/a" if value is None else f"{value:d}" if isinstance(value, int) else f"{value:.3f}"

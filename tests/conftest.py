"""Shared fixtures and helpers: tiny synthetic MNIST in the IDX layout torchvision reads (no real
MNIST, no network); our scripts run as a user would (in_process, run_script, user, trained, train,
command), and what a refusal must look like (refused); a copy of the documents and
the records for the reproduction's cases (documents, records_copy, edit_record, write_records);
read_only folders and the checkpoints on disk. The reproduction's parts are imported by the
fixtures that use them: a test of the model does not import the harness."""
import contextlib
import glob
import json
import os
import re
import runpy
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_TEST = 300, 120  # 300 = 128 + 128 + 44: the last partial batch is kept
# the line train.py prints per epoch: its number, train BCE, KL, KL weight and test loss
EPOCH_LINE = re.compile(r"epoch +(\d+) \| rec +([\d.]+) \| kl +([\d.]+) \| kl weight ([\d.]+) \| test loss +([\d.]+)")


def write_idx(raw, prefix, n, rng):
    """Blobby 28x28 'digits' (a random rectangle of ink), labels 0..9."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for image in images:
        top, left = rng.integers(2, 12, size=2)
        image[top:top + rng.integers(8, 16), left:left + rng.integers(6, 14)] = rng.integers(128, 256)
    with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw, "train", N_TRAIN, rng)
    write_idx(raw, "t10k", N_TEST, rng)
    return str(root)


def run_script(script, *args, cwd, check=True, env=None):
    """Run one of our scripts in a fresh process on the CPU, as a user would (a torch import each:
    in_process below does the rest), with `env` added to the environment. Returns the CompletedProcess."""
    command = [sys.executable, os.path.join(REPO, script), *map(str, args)]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})
    if check:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def in_process(monkeypatch, capsys):
    """Runs one of our scripts as `python3 script args` in `cwd` would, but in this process (no
    torch import per run, a tenth of run_script's cost): returns a CompletedProcess with its exit
    code, stdout and stderr; with check, asserts that it succeeded. An exception other than
    SystemExit fails the test, as the traceback it would print should."""
    def run(script, *args, cwd, check=False):
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        handler = signal.getsignal(signal.SIGTERM)  # train.py installs its own
        try:
            runpy.run_path(os.path.join(REPO, script), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)  # as the interpreter prints it
        finally:
            signal.signal(signal.SIGTERM, handler)
        out = capsys.readouterr()
        if check:
            assert code == 0, f"{script} failed:\n{out.out}\n{out.err}"
        return subprocess.CompletedProcess([script, *args], code, out.out, out.err)
    return run


@pytest.fixture
def user(tmp_path, in_process, mnist_root):
    """Runs train.py or sample.py in tmp_path on synthetic MNIST copied there (so that a case may
    break it), on the CPU: user("sample.py", "--out", "g.png") -> (code, stdout, stderr)."""
    shutil.copytree(mnist_root, tmp_path / "data")

    def run(script, *args, check=False, data="data"):
        result = in_process(script, "--data-root", data, "--device", "cpu", *args, cwd=tmp_path, check=check)
        return result.returncode, result.stdout, result.stderr
    return run


@pytest.fixture
def trained(user, tmp_path):
    """A one-epoch checkpoint, ck/mix_match_01.pth."""
    user("train.py", "--epochs", 1, "--checkpoint-dir", "ck", "--results-dir", "res", check=True)
    return tmp_path / "ck" / "mix_match_01.pth"


def train_resume_and_measure(in_process, cwd, mnist_root, model_flags, epochs):
    """train.py with model_flags straight to `epochs`, and to epochs - 1 then --resume'd to `epochs`
    without them (they come from the checkpoint); then sample.py --metrics --json on the straight
    run. Returns the resumed run's result, both final checkpoints, sample.py's result and metrics."""
    common = ["--data-root", mnist_root, "--device", "cpu", "--results-dir", "results"]
    for n, folder in [(epochs, "straight"), (epochs - 1, "first")]:
        in_process("train.py", *common, *model_flags, "--epochs", n, "--checkpoint-dir", folder, cwd=cwd, check=True)
    resumed_run = in_process("train.py", *common, "--epochs", epochs, "--checkpoint-dir", "resumed", "--resume",
                             f"first/mix_match_{epochs - 1:02d}.pth", cwd=cwd, check=True)
    straight, resumed = (torch.load(cwd / folder / f"mix_match_{epochs:02d}.pth", weights_only=True)
                         for folder in ("straight", "resumed"))
    result = in_process("sample.py", "--data-root", mnist_root, "--device", "cpu", "--checkpoint",
                        f"straight/mix_match_{epochs:02d}.pth", "--out", "grid.png", "--metrics", "--n-eval", 30,
                        "--n-samples", 4, "--n-importance", 4, "--json", "m.json", cwd=cwd, check=True)
    return resumed_run, straight, resumed, result, json.loads((cwd / "m.json").read_text(encoding="utf-8"))["metrics"]


@pytest.fixture
def command(monkeypatch, capsys, mnist_root):
    """reproduce_results.main(*flags) in this process -> (exit code, stdout, stderr), the code 0
    where it returns; MNIST is the tiny synthetic one unless --data-root is given."""
    def run(*flags):
        data = [] if "--data-root" in flags else ["--data-root", mnist_root]
        monkeypatch.setattr(sys, "argv", ["reproduce_results.py", *data, *map(str, flags)])
        code = 0
        try:
            import reproduce_results

            reproduce_results.main()
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        if isinstance(code, str):  # sys.exit("message"): printed on stderr with exit status 1
            code, err = 1, err + code + "\n"
        return code, out, err
    return run


def refused(result, *messages, code=1):
    """The script ended with `code`, no traceback, and one line on stderr (argparse adds its usage)
    holding every message. `result`: (code, stdout, stderr), or a CompletedProcess."""
    if isinstance(result, subprocess.CompletedProcess):
        result = result.returncode, result.stdout, result.stderr
    code_seen, out, err = result
    assert code_seen == code and all(message in err for message in messages), (code_seen, out, err)
    assert len(err.strip().splitlines()) == 1 or code == 2, err
    assert "Traceback" not in err and "Traceback" not in out, err


@pytest.fixture
def documents(tmp_path, monkeypatch):
    """A copy of the documents and samples/ (tables, figures) under tmp_path, the committed records'
    tables; --tables writes there. Returns a function: {path: text} of the copy, to compare."""
    import reproduce_documents

    for document in reproduce_documents.DOCUMENTS:
        os.makedirs(tmp_path / os.path.dirname(document), exist_ok=True)
        shutil.copyfile(os.path.join(REPO, document), tmp_path / document)
    shutil.copytree(os.path.join(REPO, "samples", "tables"), tmp_path / "samples" / "tables")
    monkeypatch.setattr(reproduce_documents, "DOCUMENT_ROOT", str(tmp_path))
    monkeypatch.setattr(reproduce_documents, "figures", dict)  # the tables are the point; figures take seconds

    def texts():
        return {str(p): p.read_bytes() for p in sorted(tmp_path.rglob("*.md")) if p.is_file()}
    return texts


def records_copy(tmp_path):
    """The committed records and the runs verified again, copied: records/ and verify/ in tmp_path."""
    from reproduce_documents import again_folder
    from reproduce_plan import RECORDS

    shutil.copytree(RECORDS, tmp_path / "r" / "records")
    shutil.copytree(again_folder(RECORDS), tmp_path / "r" / "verify")
    return tmp_path / "r" / "records"


def edit_record(folder, run, change):
    path = folder / f"{run}.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    change(record)
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")


@contextlib.contextmanager
def read_only(folder):
    """The folder made immutable (chattr +i): not even root may create a file in it."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)

@pytest.fixture
def train(in_process, tmp_path, mnist_root):
    """train.py in tmp_path on the CPU, into ck/ and results/: train("--epochs", 1) -> its result."""
    def run(*extra, check=True):
        return in_process("train.py", "--data-root", mnist_root, "--device", "cpu", "--checkpoint-dir", "ck",
                          "--results-dir", "results", *extra, cwd=tmp_path, check=check)
    return run

def checkpoints_on_disk(folder):
    """Every checkpoint of a folder: names and bytes; fails if a file there is not a whole checkpoint
    (train.py's lock aside)."""
    files = {os.path.basename(p): Path(p).read_bytes() for p in sorted(glob.glob(os.path.join(folder, "*")))
             if not p.endswith("train.lock")}
    assert not [name for name in files if not name.endswith(".pth")], files.keys()  # no .tmp
    for name in files:
        checkpoint = torch.load(os.path.join(folder, name), weights_only=True)
        assert all(t.isfinite().all() for t in checkpoint["model"].values() if t.is_floating_point()), name
    return files


METRICS = ["--metrics", "--n-eval", 40, "--n-samples", 3, "--n-importance", 2]


def write_records(folder, measured):
    """A record per run of the {measurement: metrics JSON} given, as the reproduction writes them."""
    folder.mkdir(exist_ok=True)
    for name, metrics in measured.items():
        run = name.rsplit("-T", 1)[0]
        path = folder / f"{run}.json"
        record = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {
            "run": run, "train": None, "config": {}, "history": [], "measurements": {}, "commit": "c",
            "torch": "t", "cpu": "cpu", "cpu_capability": "AVX2", "threads": 1}
        record["measurements"][name] = {"flags": [], "seconds": 1.0,
                                        "metrics": {"classifier_accuracy": 0.9913, "temperature": 1.0, **metrics}}
        path.write_text(json.dumps(record), encoding="utf-8")

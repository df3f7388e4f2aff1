"""Bad input, third round: caches an older version left, metric flags at their limits, MNIST as
.gz only, two runs at once, a checkout the user cannot write, and the reproduction command. Each
case runs a script as a user does (in this process, as tests/test_bad_input.py does): one message
and an exit code, never another exception, nothing lost; or, where the input is odd but valid, it
simply works."""
import contextlib
import gzip
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

import reproduce_results
from conftest import refused
from test_bad_input import METRICS
from utils import MNIST_FILES, atomic_write, newest_checkpoint, process_lock


def strict_json(path):
    """The file as JSON, refusing NaN and infinities as strict parsers do."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def ended_process_id():
    """The id of a process that has ended (a killed run's, as its lock file would name it)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ----------------------------------------------------------------------------- caches from another version

def test_caches_an_older_version_wrote_are_rebuilt_with_a_line(user, trained, tmp_path):
    user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, check=True)
    classifier = tmp_path / "checkpoint" / "digit_classifier.pth"
    neighbours = tmp_path / "checkpoint" / "mnist_neighbours.pth"
    cached = torch.load(classifier, weights_only=True)  # layers named otherwise, same MNIST files
    cached["model"] = {f"net.{key}": value for key, value in cached["model"].items()}
    torch.save(cached, classifier)
    cached = torch.load(neighbours, weights_only=True)  # a neighbours file without today's keys
    del cached["threshold"]
    torch.save(cached, neighbours)
    # before: load_state_dict's RuntimeError listing every key, then KeyError: 'threshold'
    code, out, err = user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, "--json", "m.json")
    assert code == 0, err
    assert ("retraining the digit classifier: checkpoint/digit_classifier.pth does not fit this version of the code "
            "(RuntimeError") in out
    assert ("finding the bottom neighbours again: checkpoint/mnist_neighbours.pth does not fit this version of the "
            "code (KeyError: 'threshold')") in out
    assert "threshold" in torch.load(neighbours, weights_only=True)  # rebuilt whole
    _, out, _ = user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, check=True)
    assert "retraining" not in out and "again" not in out  # and used from then on
    torch.save([1, 2], neighbours)  # not even a dict
    _, out, _ = user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, check=True)
    assert "finding the bottom neighbours again: checkpoint/mnist_neighbours.pth holds a list, not a cache" in out


# ----------------------------------------------------------------------------- metric flags at their limits

def test_metric_flags_at_their_limits_are_refused_in_one_line_or_give_strict_json(user, trained, tmp_path):
    for n_eval in (1, 2):
        for n_samples in (1, 2, 3):
            for n_importance in (1, 2):
                flags = ["--n-eval", n_eval, "--n-samples", n_samples, "--n-importance", n_importance]
                result = user("sample.py", "--checkpoint", trained, "--out", "g.png", "--metrics", *flags,
                              "--json", "m.json")
                if n_samples < 2:
                    refused(result, "--metrics needs --n-samples >= 2", code=2)
                elif n_eval < 2:  # before: 0 active units from the variance of one image (NaN), and a warning
                    refused(result, "--metrics needs --n-eval >= 2", code=2)
                elif n_eval * n_samples < 6:  # before: kthvalue's traceback
                    refused(result, "--metrics needs --n-eval x --n-samples >= 6 completions", code=2)
                else:
                    assert result[0] == 0, result
                    assert strict_json(tmp_path / "m.json")["n_eval"] == n_eval
    for alpha, undefined in [(0, {"diversity_sampling"}), (128, {"diversity_sampling", "diversity_z"})]:
        # before: zeros that read as findings; now n/a, with the reason
        code, out, err = user("sample.py", "--checkpoint", trained, "--out", "g.png", "--alpha", alpha, "--metrics",
                              "--n-eval", 3, "--n-samples", 2, "--n-importance", 1, "--json", "m.json")
        assert code == 0, err
        metrics = strict_json(tmp_path / "m.json")["metrics"]
        assert {key for key, row in metrics.items() if row["model"] is None} == undefined
        assert f"n/a: alpha {alpha}: the Sampling alone gives no diversity by construction" in out


# ----------------------------------------------------------------------------- MNIST as .gz only

def test_the_four_gz_files_alone_work_and_a_broken_one_is_named(user, tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    for name in MNIST_FILES:  # gzip'ed here, so not the MD5 of the original download
        (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
        (raw / name).unlink()
    # before: torchvision tried to download, and the message asked to replace the raw files
    code, out, err = user("train.py", "--epochs", 1, "--checkpoint-dir", "ck", "--results-dir", "res")
    assert code == 0, err
    assert f"decompressed {os.path.join('data', 'MNIST', 'raw', MNIST_FILES[0])}.gz" in out
    (raw / MNIST_FILES[2]).unlink()
    (raw / f"{MNIST_FILES[2]}.gz").write_bytes(b"not gzip")
    refused(user("train.py", "--epochs", 1, "--checkpoint-dir", "ck2", "--results-dir", "res"),
            f"{MNIST_FILES[2]}.gz is there but cannot be decompressed (BadGzipFile): replace it with an intact copy")


# ----------------------------------------------------------------------------- two at once

def test_a_second_train_py_into_the_same_folder_is_refused_and_a_dead_ones_lock_taken_over(user, tmp_path):
    (tmp_path / "ck").mkdir()
    lock = tmp_path / "ck" / "train.lock"
    host = socket.gethostname()
    # a live train.py holds the folder (this process stands in for it)
    lock.write_text(f"{host} {os.getpid()}", encoding="utf-8")
    refused(user("train.py", "--epochs", 1, "--checkpoint-dir", "ck", "--results-dir", "res"),
            f"another train.py (process {os.getpid()} on {host}) is writing checkpoints in 'ck'; wait for it to "
            f"end, or pass another --checkpoint-dir")
    assert os.listdir(tmp_path / "ck") == ["train.lock"]
    lock.write_text(f"{host} {ended_process_id()}", encoding="utf-8")  # valid: the lock of a run that was killed
    user("train.py", "--epochs", 1, "--checkpoint-dir", "ck", "--results-dir", "res", check=True)
    assert os.listdir(tmp_path / "ck") == ["mix_match_01.pth"]  # and the lock goes with the run


def test_sample_py_takes_the_newest_whole_checkpoint_while_a_training_writes_the_next(user, trained, tmp_path):
    # valid: train.py is writing epoch 2; its half-written file has a name the checkpoint glob does not match
    (tmp_path / "ck" / "0badc0de.mix_match_02.pth.tmp").write_bytes(b"PK\x03\x04 half a zip")
    assert newest_checkpoint(str(tmp_path / "ck")) == str(trained)


def test_two_writers_of_one_file_each_leave_it_whole():
    # valid: two sample.py --metrics building one cache, or writing one --out, at the same time
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"two_writers_{os.getpid()}.pth")
    try:
        def first(f):
            f.write(b"first, ")
            atomic_write(path, lambda g: g.write(b"second"))  # the other process, in the middle of the first
            f.write(b"whole")
        atomic_write(path, first)  # before: one .tmp for both, the first's rename failed on the missing .tmp
        with open(path, "rb") as f:
            assert f.read() == b"first, whole"
        assert not [name for name in os.listdir(os.path.dirname(path)) if name.endswith(f"two_writers_{os.getpid()}"
                                                                                          ".pth.tmp")]
    finally:
        os.remove(path)


def test_a_lock_names_its_host_and_a_dead_process_or_another_hosts_is_taken_over(tmp_path):
    lock, host = tmp_path / "chain.lock", socket.gethostname()
    with process_lock(str(lock)) as holder:  # what a lock holds: this host and this process
        assert holder is None and lock.read_text(encoding="utf-8") == f"{host} {os.getpid()}"
        with process_lock(str(lock)) as second:  # a second worker of the same process: held
            assert second == f"process {os.getpid()} on {host}"
    assert not lock.exists()
    # another machine's (a task SLURM requeued on another node; its process cannot be seen from here):
    # taken over, even with the id of a live process here (this one's)
    dead = ended_process_id()
    for left in (f"other-host {os.getpid()}", f"{host} {dead}", str(dead)):  # this host's dead one; an older version's
        lock.write_text(left, encoding="utf-8")
        with process_lock(str(lock)) as holder:
            assert holder is None and lock.read_text(encoding="utf-8") == f"{host} {os.getpid()}"
    lock.write_text("", encoding="utf-8")  # being written: held
    with process_lock(str(lock)) as holder:
        assert holder == "an unknown process"
    for content in (b"\x89PNG\r\n\x1a\n\0\0", b"two words and more"):  # not a lock: named, not a traceback
        lock.write_bytes(content)
        with pytest.raises(SystemExit) as e, process_lock(str(lock)):
            pass
        assert str(e.value).startswith(f"error: the lock file {lock} holds {content[:40]!r}, not a host and a process "
                                       f"id") and "delete it" in str(e.value) and lock.read_bytes() == content


# ----------------------------------------------------------------------------- a checkout the user cannot write

@contextlib.contextmanager
def read_only(folder):
    """The folder made immutable (chattr +i): not even root may create a file in it."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_checkout_samples_and_measures_with_writable_paths(user, trained, tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "out").mkdir()
    with read_only(tmp_path / "checkpoint"):
        # the caches must be built, and checkpoint/ cannot hold them: one line that names the flag
        refused(user("sample.py", "--checkpoint", trained, "--out", "out/g.png", *METRICS),
                "cannot write in the folder 'checkpoint' (Operation not permitted); pass another --cache-dir")
        user("sample.py", "--checkpoint", trained, "--out", "out/g.png", *METRICS, "--cache-dir", "out/cache",
             "--json", "out/m.json", check=True)
    assert sorted(os.listdir(tmp_path / "out" / "cache")) == ["digit_classifier.pth", "mnist_neighbours.pth"]
    for name in os.listdir(tmp_path / "out" / "cache"):  # valid: a shared install whose caches are built
        os.rename(tmp_path / "out" / "cache" / name, tmp_path / "checkpoint" / name)
    with read_only(tmp_path / "checkpoint"):
        _, out, _ = user("sample.py", "--checkpoint", trained, "--out", "out/g.png", *METRICS, check=True)
    assert "training the digit classifier" not in out
    refused(user("sample.py", "--checkpoint", trained, "--out", "out/g.png", *METRICS, "--cache-dir", "out/g.png"),
            "cannot write in the folder 'out/g.png'")


# ----------------------------------------------------------------------------- the reproduction command

def test_the_reproduction_refuses_a_wrong_data_root_before_any_training(tmp_path, in_process):
    result = in_process("tests/reproduce_results.py", "--data-root", tmp_path / "nowhere", "--runs-dir",
                        tmp_path / "runs", cwd=tmp_path)
    assert result.returncode == 1 and "MNIST is not under" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("fault, message", [
    (KeyboardInterrupt, "interrupted: the runs and measurements finished so far are kept; run the same command"),
    (OSError(28, "No space left on device", "runs/metrics/x.log"),
     "error: runs/metrics/x.log: the disk is full (No space left on device): free space, then run the same"),
])
def test_the_reproduction_stops_on_ctrl_c_or_a_full_disk_with_one_line(mnist_root, monkeypatch, fault, message):
    def faulty(args):
        raise fault
    monkeypatch.setattr(reproduce_results, "reproduce", faulty)
    monkeypatch.setattr(sys, "argv", ["reproduce_results.py", "--data-root", mnist_root])
    with pytest.raises(SystemExit, match=re.escape(message)):
        reproduce_results.main()


@pytest.mark.parametrize("content", ["{\"metrics\": {\"kl\": ", "null", "{\"checkpoint\": \"x\"}"])
def test_a_measurement_json_left_broken_is_measured_again(tmp_path, monkeypatch, capsys, content):
    args = reproduce_results.argparse.Namespace(runs_dir=str(tmp_path), records_dir=str(tmp_path / "records"),
                                                data_root="data", threads=1)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "m-T1.json").write_text(content, encoding="utf-8")  # cut short, or edited by another tool
    calls = []
    monkeypatch.setattr(reproduce_results, "run", lambda args, what, log, script, *rest: calls.append(script) or 1.0)
    assert reproduce_results.read_json(str(tmp_path / "metrics" / "m-T1.json")) is None  # before: a traceback
    reproduce_results.measure(args, "m-T1", "run", [])
    assert calls == ["sample.py"] and "its JSON is broken" in capsys.readouterr().out

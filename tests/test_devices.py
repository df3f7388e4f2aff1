"""The CUDA path, checked on a CPU-only machine.

CUDA refuses an op whose tensors sit on different devices; the CPU cannot show the mistake, since
there every tensor is a CPU tensor. So the model and the data go to the `meta` device (shapes, no
values) and every op is recorded: one whose tensor arguments (0-dim scalars aside, which may
cross devices) sit on more than one device is the bug a GPU user would meet. Ops meta cannot run
(`.item()`) end a run; the ops before them have been checked."""
import os

import pytest
import torch
import torch.serialization
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model import MixAndMatchCVAE, ModelConfig
from sample import completion_grid, evaluation_metrics
from train import evaluate, train_epoch
from utils import (
    bottom_neighbours,
    digit_classifier,
    frechet_distance,
    load_or_train_classifier,
    manifold_measures,
    multimodal_distances,
    posterior_draws,
    split_image,
)

META = torch.device("meta")
ITEM = ("aten._local_scalar_dense.default", "aten.item.default")  # .item(), as no_grad and inference_mode dispatch it


class DeviceMixRecorder(TorchDispatchMode):
    """Records every op, and those whose non-scalar tensor arguments span several devices."""

    def __init__(self):
        super().__init__()
        self.ops, self.mixed = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        devices = {str(t.device) for t in tensors}
        self.ops.append(str(func))
        if len(devices) > 1:
            self.mixed.append(f"{func} on {sorted(devices)}")
        return func(*args, **(kwargs or {}))


def record(fn, *args):
    """Run fn(*args) under the recorder, up to the end or to the first .item() (which meta cannot run)."""
    recorder = DeviceMixRecorder()
    try:
        with recorder:
            fn(*args)
    except RuntimeError as e:
        if "cannot be called on meta tensors" not in str(e):
            raise
        assert recorder.ops[-1] in ITEM  # ended at .item(), nothing else
    return recorder


@pytest.mark.parametrize("config, teacher_forcing, free_bits", [
    (ModelConfig(), 1.0, 0.0),
    (ModelConfig(conditioning="concat", decoder="autoregressive", history_dropout=0.2), 1.0, 0.5),
    (ModelConfig(decoder="recurrent", history_dropout=0.2), 0.5, 0.5)], ids=["tutorial", "concat-ar", "recurrent"])
def test_train_epoch_keeps_every_tensor_on_the_data_device(config, teacher_forcing, free_bits):
    model = MixAndMatchCVAE(config).to(META)
    # train.py's fused Adam refuses meta tensors; the plain loop makes the same updates op by op
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=False)
    recorder = record(train_epoch, model, optimizer, torch.empty(300, 784, device=META), 128, 64, 0, None,
                      teacher_forcing, free_bits)
    assert recorder.mixed == []
    # the whole epoch ran: three batches (128, 128, 44) of forward, backward and Adam, then .item()
    assert recorder.ops.count("aten.binary_cross_entropy_backward.default") == 3
    assert recorder.ops[-1] in ITEM


@pytest.mark.parametrize("config", [ModelConfig(), ModelConfig(conditioning="concat", decoder="autoregressive"),
                                    ModelConfig(conditioning="concat", decoder="recurrent")],
                         ids=["tutorial", "concat-ar", "concat-recurrent"])
def test_evaluation_sampling_and_metrics_keep_every_tensor_on_the_data_device(config):
    # K = 2 completions for the autoregressive decoder: each generated pixel's ops pass the recorder
    k = 2 if config.decoder != "mlp" else 5
    model = MixAndMatchCVAE(config).to(META).eval()
    images = torch.empty(30, 784, device=META)
    data, condition = split_image(images)
    real = {"held_out": torch.empty(20, 784, device=META), "train": torch.empty(40, 784, device=META),
            "neighbour_tops": torch.empty(30, 3, 500, device=META), "threshold": 4.5}
    for fn, args in [(evaluate, (model, images, 64)),
                     (completion_grid, (model, images, 64, k)),  # sample() and complete()
                     (posterior_draws, (model, data, condition, 64, 4)),
                     (evaluation_metrics, (model, digit_classifier().to(META).eval(), images, 64, k, 4, 1.0, real))]:
        recorder = record(fn, *args)
        assert recorder.mixed == [], fn.__name__
        assert len(recorder.ops) > 50, fn.__name__  # it did run
    if config.conditioning != "concat":
        assert "aten.randperm.default" in record(completion_grid, model, images, 64, 5).ops  # a Sampling per column


def test_fidelity_measures_and_bottom_neighbours_keep_every_tensor_on_the_data_device():
    # evaluation_metrics stops at its first .item(), before these: here on their own, to their end
    features = torch.empty(20, 128, device=META)
    for fn, args in [(manifold_measures, (features, features)), (frechet_distance, (features, features)),
                     (bottom_neighbours, (torch.empty(7, 784, device=META), torch.empty(50, 784, device=META), 4)),
                     (multimodal_distances, (torch.empty(7, 5, 500, device=META),
                                             torch.empty(7, 3, 500, device=META), 4.5))]:
        recorder = record(fn, *args)
        assert recorder.mixed == [] and len(recorder.ops) > 3, fn.__name__


def test_digit_classifier_training_keeps_every_tensor_on_the_data_device(tmp_path, mnist_root):
    recorder = record(load_or_train_classifier, str(tmp_path / "classifier.pth"), mnist_root, META, 1)
    assert recorder.mixed == []
    assert recorder.ops.count("aten.convolution_backward.default") >= 2 * 3  # 2 convolutions, 3 batches of 128


def save_as_if_on_a_gpu(obj, path, monkeypatch):
    """torch.save, with every storage tagged cuda:0, as a checkpoint written on a GPU is."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows what a CPU-only machine does")
def test_a_gpu_checkpoint_samples_and_resumes_on_a_cpu_only_machine(tmp_path, mnist_root, monkeypatch, in_process):

    common = ["--data-root", mnist_root, "--device", "cpu", "--results-dir", tmp_path / "results"]
    in_process("train.py", *common, "--epochs", "2", "--checkpoint-dir", "straight", cwd=tmp_path, check=True)
    in_process("train.py", *common, "--epochs", "1", "--checkpoint-dir", "first", cwd=tmp_path, check=True)
    checkpoint = torch.load(tmp_path / "first" / "mix_match_01.pth", weights_only=True)
    checkpoint["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # one GPU's generator state
    save_as_if_on_a_gpu(checkpoint, tmp_path / "gpu.pth", monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):  # what loading without map_location would do
        torch.load(tmp_path / "gpu.pth", weights_only=True)

    result = in_process("sample.py", "--data-root", mnist_root, "--device", "cpu", "--checkpoint", "gpu.pth",
                        "--out", "grid.png", cwd=tmp_path, check=True)
    assert "wrote grid.png" in result.stdout

    result = in_process("train.py", *common, "--epochs", "2", "--checkpoint-dir", "resumed", "--resume", "gpu.pth",
                        cwd=tmp_path, check=True)
    assert "CUDA generator states for 1 GPU(s) and this machine has 0" in result.stdout
    assert "the CPU generator's state is restored" in result.stdout
    # the CPU generator drew this run's batches and Samplings, so the resumed run is the straight one
    resumed = torch.load(tmp_path / "resumed" / "mix_match_02.pth", weights_only=True)["model"]
    straight = torch.load(tmp_path / "straight" / "mix_match_02.pth", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert os.listdir(tmp_path / "resumed") == ["mix_match_02.pth"]

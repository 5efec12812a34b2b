"""bench.memory: the saved activations counted, the step estimate, and the refusal of a step that does not fit."""

import math

import pytest
import torch
from torch import nn

from bench import memory
from bench.errors import BenchError


def mlp() -> nn.Module:
    # autograd saves the first Linear's input (B×10) and the ReLU's output (B×20), which the second Linear saves
    # again (the same storage); the weights are parameters, left out
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_saved_activations_are_the_distinct_tensors_autograd_keeps(batch: int) -> None:
    assert memory.saved_activation_bytes(mlp(), torch.zeros(batch, 10)) == batch * (10 + 20) * 4


def test_a_step_is_the_activations_per_example_times_the_batch_plus_the_parameters_state() -> None:
    parameters = (10 * 20 + 20 + 20 * 5 + 5) * 4
    expected = int(30 * 4 * 256 * memory.PEAK_OVER_SAVED) + memory.STATE_PER_PARAMETER * parameters
    assert memory.step_bytes(mlp(), (10,), 256) == expected


def test_the_estimate_leaves_the_network_and_the_random_stream_as_they_were() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 36, 2))
    net.eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(3)
    assert memory.step_bytes(net, (1, 8, 8), 64) > 0
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))  # the probe's dropout drew from a forked stream
    assert not net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())  # BN stats too


def test_a_step_that_does_not_fit_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    need = memory.step_bytes(mlp(), (10,), 1000)
    enough = math.ceil(need / memory.USABLE)  # a step may take 90% of the free memory
    monkeypatch.setattr(memory, "available_bytes", lambda device: enough - 2)
    with pytest.raises(BenchError, match=r"^the net: a training step at batch 1000 needs about .* GiB and cpu has "
                                         r".* GiB free \(a step may use 90% of it\); use a GPU$") as e:  # fmt: skip
        memory.check_fits("the net", mlp(), (10,), 1000, cpu, advice="use a GPU")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(memory, "available_bytes", lambda device: enough)
    memory.check_fits("the net", mlp(), (10,), 1000, cpu, advice="use a GPU")  # just fits
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    memory.check_fits("the net", mlp(), (10,), 10**9, cpu, advice="use a GPU")  # unknown: not checked


def test_the_cpu_s_free_memory_is_read_on_linux() -> None:
    free = memory.available_bytes(torch.device("cpu"))
    if free is None:
        pytest.skip("no /proc/meminfo here")
    assert 0 < free < 1 << 50


def test_memory_the_process_keeps_for_reuse_counts_as_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a large step the process holds its freed memory (bench.allocator's settings), which MemAvailable no
    longer counts: without it a second classifier after ResNeXt-29 was refused with "1.7 GiB free"."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "freed_heap_bytes", lambda: 0)
    base = memory.available_bytes(cpu)
    if base is None:
        pytest.skip("no /proc/meminfo here")
    monkeypatch.setattr(memory, "freed_heap_bytes", lambda: 20 << 30)
    free = memory.available_bytes(cpu)
    assert free is not None and abs(free - base - (20 << 30)) < 256 << 20  # MemAvailable moves a little meanwhile

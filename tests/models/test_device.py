"""`resolve_device`: `auto` picks CUDA when present, else the CPU; a device that is not there fails in one line."""

from __future__ import annotations

import pytest
import torch

from dlm.models.device import resolve_device
from dlm.settings import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the messages name 0 visible CUDA devices")


@no_cuda
@pytest.mark.parametrize("device", ["auto", None])
def test_auto_and_none_mean_the_cpu_without_cuda(device):
    assert resolve_device(device) == torch.device("cpu")


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cpu_passes_as_a_string_or_a_device(device):
    assert resolve_device(device) == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("device", ["cuda:7", "cuda", "cuda:0", torch.device("cuda", 7)])
def test_missing_cuda_device_fails_in_one_line_naming_what_is_allowed(device):
    match = rf"^device='{device}': no such CUDA device \(0 visible\); allowed: auto, cpu$"
    with pytest.raises(ConfigError, match=match):
        resolve_device(device)


@no_cuda
def test_the_error_names_the_key_it_was_given():
    match = r"^eval\.device='cuda:7': no such CUDA device \(0 visible\); allowed: auto, cpu$"
    with pytest.raises(ConfigError, match=match):
        resolve_device("cuda:7", key="eval.device")


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", "cuda:-1", ""])
def test_garbage_device_string_fails_in_one_line(device):
    match = rf"^device='{device}': unknown device; allowed: auto, cpu, cuda, cuda:N$"
    with pytest.raises(ConfigError, match=match) as err:
        resolve_device(device)
    assert "\n" not in str(err.value)


def test_a_value_of_the_wrong_type_fails_in_one_line():
    with pytest.raises(ConfigError, match=r"^device='\[1\]': unknown device; allowed: auto, cpu, cuda, cuda:N$") as err:
        resolve_device([1])
    assert "\n" not in str(err.value)

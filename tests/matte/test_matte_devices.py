"""Where the saliency model runs: onnxruntime's CUDA provider where the build has it, else the CPU."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from stages.core.errors import PipelineError
from stages.matte.config import MatteConfig
from stages.matte.model import CPU_PROVIDER, CUDA_PROVIDER, choose_providers

GPU_BUILD = [CUDA_PROVIDER, CPU_PROVIDER]
CPU_BUILD = ["AzureExecutionProvider", CPU_PROVIDER]


@pytest.mark.parametrize("device, available, expected", [
    ("auto", GPU_BUILD, [CUDA_PROVIDER, CPU_PROVIDER]),
    ("cuda", GPU_BUILD, [CUDA_PROVIDER, CPU_PROVIDER]),
    ("cpu", GPU_BUILD, [CPU_PROVIDER]),
    ("auto", CPU_BUILD, [CPU_PROVIDER]),
    ("cpu", CPU_BUILD, [CPU_PROVIDER]),
])
def test_provider_choice(device, available, expected):
    assert choose_providers(device, available) == expected


def test_cuda_without_a_cuda_build_is_an_error_naming_what_is_there():
    with pytest.raises(PipelineError, match="no CUDAExecutionProvider .*AzureExecutionProvider.*onnxruntime-gpu"):
        choose_providers("cuda", CPU_BUILD)


def test_this_machines_build_gets_a_working_choice():
    providers = choose_providers("auto", ort.get_available_providers())
    assert providers[-1] == CPU_PROVIDER and set(providers) <= set(ort.get_available_providers())


def test_the_device_is_a_knob_outside_the_config_hash():
    assert "device" in MatteConfig.knobs() and MatteConfig(device="cpu").result_fields() == MatteConfig().result_fields()

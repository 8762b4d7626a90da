"""Hardware profiles on simulated machines: kind, usable memory and how it was measured."""

import pytest

from diffgen.planning.hardware import DISPLAY_RESERVE, HEADLESS_RESERVE, HOST_RESERVE, GpuInfo, Probes, classify, detect

GiB = 1024**3


def machine(gpus=(), meminfo=None, mps=None, nvml=None):
    return Probes(cuda_devices=lambda: list(gpus), meminfo=lambda: meminfo or {"MemTotal": 64 * GiB,
                                                                              "MemAvailable": 60 * GiB},
                  mps=lambda: mps, nvml=nvml or (lambda index: None))


def test_dgx_spark_budget_comes_from_memavailable_not_cuda():
    # cudaMemGetInfo on GB10 reports MemFree (page cache counted as used): 30 GiB here, far too low.
    gb10 = GpuInfo("NVIDIA GB10", (12, 1), total=int(121.7 * GiB), free=30 * GiB, integrated=True)
    profile = detect(machine([gb10], {"MemTotal": int(121.7 * GiB), "MemAvailable": 110 * GiB}))
    assert profile.kind == "dgx-spark" and profile.unified
    device = profile.devices[0]
    reserve = max(HOST_RESERVE, int(121.7 * GiB) // 20)
    assert device.usable == 110 * GiB - reserve
    assert "MemAvailable" in device.measured and device.fp8 and device.bf16
    assert any("freeze" in note for note in profile.notes)


def test_unified_budget_is_capped_by_the_device_total():
    igpu = GpuInfo("NVIDIA Jetson AGX Orin", (8, 7), total=32 * GiB, free=10 * GiB, integrated=True)
    profile = detect(machine([igpu], {"MemTotal": 64 * GiB, "MemAvailable": 60 * GiB}))
    assert profile.kind == "unified-gpu"
    assert profile.devices[0].usable == 32 * GiB - HOST_RESERVE


def test_rtx_4090_driving_a_display_keeps_a_larger_reserve():
    gpu = GpuInfo("NVIDIA GeForce RTX 4090", (8, 9), total=24 * GiB, free=22 * GiB, display=True)
    profile = detect(machine([gpu]))
    assert profile.kind == "consumer-rtx"
    assert profile.devices[0].usable == 22 * GiB - DISPLAY_RESERVE
    assert "display" in profile.devices[0].measured and profile.devices[0].fp8


def test_rtx_5090_headless():
    gpu = GpuInfo("NVIDIA GeForce RTX 5090", (12, 0), total=32 * GiB, free=31 * GiB)
    profile = detect(machine([gpu]))
    assert profile.kind == "consumer-rtx" and profile.devices[0].usable == 31 * GiB - HEADLESS_RESERVE


def test_h100_prefers_nvml_when_present():
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), total=80 * GiB, free=79 * GiB)
    profile = detect(machine([gpu], nvml=lambda index: (80 * GiB, 78 * GiB)))
    assert profile.kind == "datacenter"
    assert profile.devices[0].usable == 78 * GiB - HEADLESS_RESERVE and "NVML" in profile.devices[0].measured


def test_two_rtx_3090s():
    gpus = [GpuInfo("NVIDIA GeForce RTX 3090", (8, 6), total=24 * GiB, free=23 * GiB) for _ in range(2)]
    profile = detect(machine(gpus))
    assert [d.device for d in profile.devices] == ["cuda:0", "cuda:1"]
    assert all(d.bf16 and not d.fp8 for d in profile.devices)  # Ampere: bf16, no fp8
    assert any("2 GPUs" in note for note in profile.notes)


def test_apple_m_series():
    profile = detect(machine(mps=48 * GiB, meminfo={"MemTotal": 64 * GiB, "MemAvailable": 40 * GiB}))
    assert profile.kind == "apple-mps" and profile.devices[0].device == "mps"
    assert profile.devices[0].usable == 40 * GiB - HOST_RESERVE  # capped by available RAM


def test_cpu_only_box():
    profile = detect(machine(meminfo={"MemTotal": 32 * GiB, "MemAvailable": 20 * GiB}))
    assert profile.kind == "cpu" and profile.devices[0].usable == 18 * GiB
    assert profile.to_dict()["kind_label"] == "CPU only"


@pytest.mark.parametrize("name, kind", [
    ("NVIDIA A100-SXM4-80GB", "datacenter"), ("NVIDIA L40S", "datacenter"), ("NVIDIA H200", "datacenter"),
    ("NVIDIA RTX A6000", "workstation"), ("NVIDIA RTX 6000 Ada Generation", "workstation"),
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "workstation"), ("NVIDIA GeForce RTX 3060", "consumer-rtx"),
])
def test_classification_by_name(name, kind):
    assert classify(GpuInfo(name, (8, 0), total=1, free=1)) == kind


def test_real_probes_on_this_machine():
    profile = detect()
    assert profile.devices and profile.devices[0].usable >= 0 and profile.host_total > 0


def test_host_memory_is_the_kernels_memavailable():
    from pathlib import Path

    from diffgen.planning.hardware import read_meminfo

    info = read_meminfo()
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
              if line.split(":")[0] in ("MemTotal", "MemAvailable")}
    assert info["MemTotal"] == fields["MemTotal"]
    # Read a moment apart: other processes may have moved a little memory in between.
    assert abs(info["MemAvailable"] - fields["MemAvailable"]) < GiB


def test_host_memory_comes_from_psutil_on_every_platform(monkeypatch):
    import collections

    import psutil

    from diffgen.planning.hardware import read_meminfo

    fake = collections.namedtuple("svmem", "total available")(64 * GiB, 40 * GiB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    assert read_meminfo() == {"MemTotal": 64 * GiB, "MemAvailable": 40 * GiB}

"""MFU's denominator: the dense peak of the device, from the table or the override, and
none at all where it is not known (no made-up utilisation)."""

from __future__ import annotations

import pytest

from orchestrator.trainer import throughput


@pytest.mark.parametrize(("name", "precision", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "fp16", 989.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA L40S", "bf16", 362.1),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA A10G", "bf16", None),  # no published dense rate: no MFU, not A10's
    ("NVIDIA H100 80GB HBM3", "fp32", None),  # fp32 peaks depend on TF32 settings
    ("Some Future GPU", "bf16", None),
    (None, "bf16", None),  # CPU
])
def test_peak_comes_from_the_table_or_not_at_all(
    monkeypatch: pytest.MonkeyPatch, name: str | None, precision: str, tflops: float | None
) -> None:
    monkeypatch.delenv(throughput.PEAK_ENV, raising=False)
    peak = throughput.peak_flops(precision, name)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_the_override_wins_even_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(throughput.PEAK_ENV, "2.5")
    assert throughput.peak_flops("fp32", None) == pytest.approx(2.5e12)
    monkeypatch.setenv(throughput.PEAK_ENV, "fast")
    assert throughput.peak_flops("bf16", "NVIDIA H100") is None


def test_mfu_is_model_flops_over_the_peak_of_every_device() -> None:
    fm = throughput.FlopsModel(frozen=1000, trainable=10, layers=2, hidden=8, context=4)
    assert fm.per_token == 4 * 1000 + 6 * 10 + 12 * 2 * 8 * 4
    assert throughput.mfu(500.0, fm.per_token, 1e9, 2) == pytest.approx(
        500 * fm.per_token / 2e9)
    assert throughput.mfu(500.0, fm.per_token, None, 2) is None

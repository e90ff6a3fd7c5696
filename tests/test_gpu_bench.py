"""benchmarks/gpu_bench.py (run by benchmarks/gpu.sh on a GPU) in its --tiny CPU mode."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest
import torch

from conftest import REPO


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_cpu_run_reports_throughput_flops_and_no_mfu(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # --device cpu sets it; restored after the test
    threads = torch.get_num_threads()
    try:
        result = _gpu_bench().main(["--device", "cpu", "--tiny", "--batch-sizes", "4", "--precisions", "fp32,bf16"])
    finally:
        torch.set_num_threads(threads)  # the tiny run pins 1 thread
    saved = json.loads((out / "gpu_bench.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["encoder"]["parameters"] > 0
    rows = saved["rows"]
    assert [(r["method"], r["precision"]) for r in rows] == [("text", "fp32"), ("amess", "fp32"),
                                                              ("text", "bf16"), ("amess", "bf16")]
    for r in rows:
        assert r["batch_size"] == 4 and r["compile"] is False and r["tf32"] is False
        assert r["flops_per_sample"] > 0 and r["train_tflops_per_s"] > 0
        assert r["train_samples_per_s"] > 0 and r["infer_samples_per_s"] > 0
        assert r["train_samples_per_s_min"] <= r["train_samples_per_s"] <= r["train_samples_per_s_max"]
        assert r["mfu"] is None and r["peak_gpu_mib_train"] is None and r["peak_gpu_mib_infer"] is None
    by = {(r["method"], r["precision"]): r for r in rows}
    # A-MESS runs the encoder over the text view and the label descriptions too
    assert by[("amess", "fp32")]["flops_per_sample"] > 2 * by[("text", "fp32")]["flops_per_sample"]
    md = (out / "gpu_bench.md").read_text()
    assert "| method | precision | compile | batch |" in md and "| amess | bf16 | no | 4 |" in md
    assert "MFU: none on a CPU" in md and "amess step time" in md


def _run(tmp_path, monkeypatch, *flags):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    threads = torch.get_num_threads()
    try:
        _gpu_bench().main(["--device", "cpu", "--tiny", "--batch-sizes", "4", "--precisions", "fp32", *flags])
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "out"
    return json.loads((out / "gpu_bench.json").read_text()), (out / "gpu_bench.md").read_text()


def test_compiled_rows_reuse_the_eager_flop_count(tmp_path, monkeypatch):
    import functools

    # dynamo's capture without inductor's code generation (minutes on a CPU): the same code path
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    try:
        saved, md = _run(tmp_path, monkeypatch, "--methods", "text", "--compile")
    finally:
        torch._dynamo.reset()
    eager, compiled = saved["rows"]
    assert (eager["compile"], compiled["compile"]) == (False, True) and not saved["meta"]["failed"]
    assert compiled["flops_per_sample"] == eager["flops_per_sample"] > 0 and compiled["train_samples_per_s"] > 0
    assert "| text | fp32 | yes | 4 |" in md and "compiled trains" in md


def test_a_configuration_past_the_deadline_is_reported_not_fatal(tmp_path, monkeypatch):
    saved, md = _run(tmp_path, monkeypatch, "--methods", "text", "--deadline-s", "0")
    assert saved["rows"] == [] and len(saved["meta"]["failed"]) == 1
    assert "TimeoutError" in saved["meta"]["failed"][0] and "Failed: fp32 batch 4" in md


def test_the_deadline_alarm_is_not_swallowed_by_an_oserror_fallback():
    import time

    deadline = _gpu_bench()._deadline
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="deadline"):
        with deadline(0.05):
            while time.perf_counter() - t0 < 5:
                try:  # a library probing a file: a TimeoutError is an OSError
                    time.sleep(0.005)
                except OSError:
                    pass
    assert time.perf_counter() - t0 < 2


def test_peak_table_matches_device_names():
    peak = _gpu_bench().peak_tflops
    assert peak("NVIDIA H200") == peak("NVIDIA H100 80GB HBM3") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0 and peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("NVIDIA L40S") == 362.0 and peak("NVIDIA L4") == 121.0
    assert peak("Tesla T4") is None


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_sh_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu.sh")]).returncode == 0

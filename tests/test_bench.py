"""`bench()` and `sequencer bench`: the twin check, the side-by-side records and ratios, the files, the memory probe."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import timm
import torch

from sequencer import bench
from sequencer.cli import build_parser
from sequencer.errors import UsageError


def _run(tmp_path: Path, *flags: str) -> dict:
    args = build_parser("bench").parse_args(
        ["bench", "--output", str(tmp_path / "b.1"), "--repeats", "1", "--warmup", "0", "--threads", "1", *flags]
    )
    assert bench.run(args) == 0
    return json.loads((tmp_path / "b.1.json").read_text())  # the stem as given, dots and all


def test_ours_runs_beside_timms_twin_and_our_reference_with_ratios(tmp_path: Path) -> None:
    report = _run(tmp_path, "--models", "sequencer2d_s", "--resolutions", "32", "-b", "1", "--no-memory")
    rows = report["results"]
    assert [(r["mode"], r["implementation"]) for r in rows] == [
        (mode, label) for mode in ("infer", "train") for label in ("timm", "ours(auto)", "ours(reference)")
    ]

    def speed_of(implementation: str, beside: dict) -> float:
        """The images/s of `implementation` measured on the same model in the same setting as the row `beside`."""
        same = ("model", "mode", "precision", "resolution", "batch_size")
        [peer] = [
            r for r in rows if r["implementation"] == implementation and all(r[key] == beside[key] for key in same)
        ]
        return peer["images_per_s"]

    for r in rows:
        assert r["images_per_s"] > 0 and r["precision"] == "float32" and r["resolution"] == 32
        if r["source"] == "ours":
            assert r["speed_vs_timm"] == pytest.approx(r["images_per_s"] / speed_of("timm", r))
            assert r["speed_vs_reference"] == pytest.approx(r["images_per_s"] / speed_of("ours(reference)", r))
    assert report["environment"]["threads"] == 1
    with (tmp_path / "b.1.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and table[0]["implementation"] == "timm"  # the ratios' columns all the same:
    assert float(table[1]["speed_vs_timm"]) == pytest.approx(rows[1]["speed_vs_timm"])
    assert (tmp_path / "b.1.png").stat().st_size > 10_000  # one resolution: bars side by side


def test_bench_in_python_returns_a_record_per_subject_and_setting_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    reported = []
    records = bench.bench(
        models=["sequencer2d_tiny"],
        resolutions=[32],
        batch_sizes=[1, 2],
        modes=["infer"],
        measure_memory=False,
        repeats=3,
        warmup=0,
        threads=1,
        report=lambda setting, found: reported.append((setting, found)),
    )
    assert [(r["batch_size"], r["implementation"]) for r in records] == [
        (b, v) for b in (1, 2) for v in ("ours(auto)", "ours(reference)")
    ]
    assert [setting.batch_size for setting, _ in reported] == [1, 2]
    assert [r for _, found in reported for r in found] == records
    for r in records:
        assert len(r["step_ms_all"]) == 3 and r["step_ms"] == pytest.approx(sorted(r["step_ms_all"])[1])
        assert r["images_per_s"] == pytest.approx(1000 * r["batch_size"] / r["step_ms"])
        assert r["peak_memory_mib"] is None and r["speed_vs_timm"] is None  # sequencer2d_tiny has no timm twin
    reference = [r for r in records if r["implementation"] == "ours(reference)"]
    assert [r["speed_vs_reference"] for r in reference] == [1.0, 1.0]
    assert not list(tmp_path.iterdir())
    with pytest.raises(UsageError, match="--precisions fp16: expected some of float32, amp"):
        bench.bench(models=["sequencer2d_tiny"], precisions=["fp16"], measure_memory=False)


def test_twin_check_refuses_a_timm_model_with_other_weights() -> None:
    ours = bench.build_subject_model(bench.Subject("sequencer2d_s", "ours", "auto"), 32)
    twin = timm.create_model("sequencer2d_s")
    torch.nn.init.normal_(twin.head.fc.weight, std=0.02)  # timm's head starts at zero too: make them differ
    with pytest.raises(RuntimeError, match="differs from ours"):
        bench.check_twin(ours, twin, "sequencer2d_s", 32, torch.device("cpu"))
    twin.load_state_dict(ours.state_dict())
    bench.check_twin(ours, twin, "sequencer2d_s", 32, torch.device("cpu"))


def test_resolution_sweep_of_peers_writes_csv_and_plot(tmp_path: Path) -> None:
    report = _run(
        tmp_path,
        "--models",
        "sequencer2d_tiny,test_vit",
        "--resolutions",
        "32,48",
        "-b",
        "2",
        "--modes",
        "infer",
        "--impls",
        "fused",
        "--no-memory",
    )
    found = {(r["model"], r["implementation"], r["resolution"]) for r in report["results"]}
    assert found == {
        (m, v, s) for m, v in [("sequencer2d_tiny", "ours(fused)"), ("test_vit", "timm")] for s in (32, 48)
    }
    assert (tmp_path / "b.1.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--models", "sequencer9"], "unknown model 'sequencer9'"),
        (["--repeats", "0"], "argument --repeats: 0 is out of range: it must be >= 1"),
        (["-b", "0"], "argument -b/--batch-size: 0 is out of range: it must be >= 1"),
        (["--resolutions", "4"], "--resolutions 4 is below the 8 px that sequencer2d_tiny needs"),
        (["--device", "tpu9"], "unknown device 'tpu9'"),
        (["--modes", "train", "--runtimes", "torch-compile", "--no-timm-twin"], "nothing to measure: "),
    ],
)
def test_bad_input_is_refused_in_one_line_before_any_work(
    assert_refused, flags: list[str], message: str, tmp_path: Path
) -> None:
    argv = ["bench", "--models", "sequencer2d_tiny", "--output", str(tmp_path / "out" / "b"), "--no-memory", *flags]
    assert_refused(*argv, match=re.escape(message), absent=[tmp_path / "out"])


def test_memory_needs_a_resettable_peak_or_no_memory(
    assert_refused, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "CLEAR_REFS", str(tmp_path / "no" / "clear_refs"))  # a system without it
    argv = ["bench", "--models", "sequencer2d_tiny", "--device", "cpu", "--output", str(tmp_path / "b")]
    assert_refused(*argv, match="pass --no-memory", unchanged=tmp_path)


def test_bad_lists_are_refused_by_the_parser(assert_refused) -> None:
    for flags, message in (
        (["--impls", "auto,triton"], "unknown triton; expected some of auto, reference, fused"),
        (["--precisions", "float64"], "unknown float64"),
        (["--resolutions", "224,big"], "invalid int value: 'big'"),
        (["--batch-sizes", "0"], "0 is out of range: it must be >= 1"),
        (["--runtimes", "torch,tensorrt"], "unknown tensorrt"),
    ):
        assert_refused("bench", *flags, match=f"error: argument {flags[0]}: {re.escape(message)}")


@pytest.mark.slow
def test_memory_probe_sees_what_a_training_step_adds() -> None:
    subject = bench.Subject("sequencer2d_tiny", "ours", "reference")
    cpu = torch.device("cpu")
    infer = bench.measure_peak_memory(subject, bench.Setting("infer", "float32", 64, 32), cpu, 1, None)
    train = bench.measure_peak_memory(subject, bench.Setting("train", "float32", 64, 32), cpu, 1, None)
    # Training keeps every block's activations plus gradients and AdamW state; inference keeps one block's at most.
    assert 0 < infer < train / 2, (infer, train)


def test_onnxruntime_runtimes_run_the_same_weights_beside_torch_in_float32_inference_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "native_bfloat16_cpu", lambda: False)  # an AVX2-only CPU
    x, outputs, files, real_build_models = torch.randn(3, 3, 32, 32), {}, set(), bench.build_models

    def build_models_and_run_them(subjects: list, resolution: int, *rest: object) -> dict:
        """What bench builds, run on `x` before its steps train the PyTorch model; the files it runs."""
        built = real_build_models(subjects, resolution, *rest)
        with torch.no_grad():
            for subject, model in built.items():
                if subject.source == "ours":
                    outputs[subject.runtime] = (model.eval() if isinstance(model, torch.nn.Module) else model)(x)
        files.update(path.name for path in rest[1].glob("*.onnx"))
        return built

    monkeypatch.setattr(bench, "build_models", build_models_and_run_them)
    report = _run(
        tmp_path,
        "--models",
        "sequencer2d_tiny",
        "--resolutions",
        "32",
        "-b",
        "2",
        "--precisions",
        "float32,amp",
        "--runtimes",
        "torch,onnxruntime,onnxruntime-int8",
        "--impls",
        "auto",
        "--no-memory",
    )
    found = [(r["mode"], r["precision"], r["implementation"], r["runtime"]) for r in report["results"]]
    # The int8 file's rows say int8, not the float32 of the setting they were measured in.
    ran = (("float32", "onnxruntime"), ("int8", "onnxruntime-int8"))
    onnx_rows = [("infer", kind, f"ours+{name}", name) for kind, name in ran]
    assert found == [
        ("infer", "float32", "ours(auto)", "torch"),
        *onnx_rows,
        ("infer", "amp", "ours(auto)", "torch"),  # onnxruntime has no bfloat16 CPU path
        ("train", "float32", "ours(auto)", "torch"),
        ("train", "amp", "ours(auto)", "torch"),
    ]
    assert all(r["images_per_s"] > 0 for r in report["results"])
    assert report["environment"]["onnxruntime"] and report["environment"]["cpu_native_bfloat16"] is False
    printed = capsys.readouterr().out
    assert "no AVX512-BF16 or AMX: the amp (bfloat16) settings time its emulation" in printed
    assert "ours+onnxruntime-int8 (int8)" in printed  # in the float32 block, the row says what it computed in

    # What those rows ran: the export of the weights the PyTorch rows ran, as is and with int8 weights.
    ours, exported, quantized = outputs["torch"], outputs["onnxruntime"], outputs["onnxruntime-int8"]
    assert (exported - ours).abs().max().item() < 1e-4 < (quantized - ours).abs().max().item()
    assert files == {
        "sequencer2d_tiny-32-onnxruntime.onnx",
        "sequencer2d_tiny-32-onnxruntime-int8.onnx",
    }


@pytest.mark.slow
def test_compiled_and_onnxruntime_subjects_get_their_peak_memory(tmp_path: Path) -> None:
    report = _run(
        tmp_path,
        "--models",
        "sequencer2d_tiny",
        "--resolutions",
        "32",
        "-b",
        "2",
        "--modes",
        "infer",
        "--runtimes",
        "torch-compile,onnxruntime",
        "--impls",
        "reference",
    )
    rows = {r["implementation"]: r for r in report["results"]}
    assert sorted(rows) == ["ours(reference)+compile", "ours+onnxruntime"]
    assert rows["ours+onnxruntime"]["peak_memory_mib"] > 0  # its first run's arena, at least
    assert rows["ours(reference)+compile"]["peak_memory_mib"] is not None


def test_onnxruntime_runtimes_without_onnxruntime_name_the_extra_before_any_work(
    assert_refused, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import` sees for a package that is not installed
    argv = ["bench", "--models", "sequencer2d_tiny", "--runtimes", "torch,onnxruntime", "--no-memory"]
    match = r'error: --runtimes onnxruntime.*pip install "sequencer\[export\]"'
    assert_refused(*argv, "--output", tmp_path / "out" / "b", match=match, absent=[tmp_path / "out"])

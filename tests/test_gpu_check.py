"""scripts/gpu_check.sh without a GPU: the dry run end to end, the loud abort of a real run that
cannot see a GPU, a failing stage failing the run, and the pieces (stage list, junit / sanitizer
parsing, the pytest selection plugin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts" / "gpu_check"))

import gc_results  # noqa: E402
import gc_stages  # noqa: E402


def _run(out: Path, timeout: float, **env) -> tuple:
    e = dict(os.environ, PYTHON=sys.executable, **env)
    t = time.monotonic()
    p = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=timeout,
                       env=e, cwd=ROOT)
    return p, time.monotonic() - t


def _last_block(stdout: str) -> list:
    lines = stdout.rstrip().splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("== gpu_check "))
    return lines[start:]


def _tar_names(out: Path) -> list:
    with tarfile.open(out / "logs.tar.gz") as tar:
        return tar.getnames()


def test_script_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    p, secs = _run(out, 170, GPU_CHECK_DRY_RUN="1")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    # ~70 s alone on the 2-core dev VM (each stage starts a Python that imports torch), 88 s beside
    # the rest of the suite: the bound catches a stage list that grows, not host noise.
    assert secs < 150, f"the dry run took {secs:.0f} s"
    block = _last_block(p.stdout)  # the summary table comes last
    assert "PASS" in block[0] and block[-1].startswith("report: ")
    for stage in ("env", "build", "layer_norm:cuda", "layer_norm:triton", "layer_norm:check",
                  "layer_norm:memcheck", "layer_norm:bench"):
        assert any(ln.startswith(stage + " ") for ln in block), stage
    report = (out / "report.md").read_text()
    assert "**Result: PASS**" in report and "| layer_norm:triton | PASS |" in report
    assert "unavailable" in report  # no compute-sanitizer here
    assert len(list(out.iterdir())) <= 8  # what a device run can bring back
    assert (out / "bench.csv").read_text().startswith("op,")
    names = _tar_names(out)
    for f in ("logs/layer_norm-cuda.xml", "logs/layer_norm-triton.xml", "logs/layer_norm-cuda.events.jsonl",
              "logs/env.txt", "logs/layer_norm-check.log"):
        assert f in names
    data = json.loads((out / "results.json").read_text())
    cuda = next(s for s in data["stages"] if s["name"] == "layer_norm:cuda")
    assert cuda["counts"]["passed"] >= 1 and cuda["counts"]["failed"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here: a real run would not abort")
def test_real_run_aborts_loudly_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    p, _ = _run(out, 120, GPU_CHECK_DRY_RUN="0")
    assert p.returncode == 3, p.stdout[-2000:]
    assert "NOT A GPU RUN" in p.stderr
    assert "ABORTED" in _last_block(p.stdout)[0]
    report = (out / "report.md").read_text()
    assert "ABORTED: torch cannot use the expected GPU" in report
    assert "| build | NOT RUN |" in report


def test_a_failing_stage_fails_the_run(tmp_path):
    (tmp_path / "test_planted.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.cuda
        def test_planted_failure():
            assert 1 + 1 == 3, "planted failure"

        @pytest.mark.cuda
        def test_passes():
            pass
    """))
    (tmp_path / "test_needs_missing.py").write_text("import not_a_real_module_xyz\n\ndef test_x():\n    pass\n")
    (tmp_path / "workload.py").write_text("print('  3 fp32 FAIL dx 1e-1')\nraise SystemExit(1)\n")
    (tmp_path / "stages.txt").write_text(
        f"fake tests={tmp_path}/test_planted.py,{tmp_path}/test_needs_missing.py cuda=40\n"
        f"fakework workload={tmp_path}/workload.py check=20\n")
    out = tmp_path / "out"
    p, _ = _run(out, 150, GPU_CHECK_DRY_RUN="1", GPU_CHECK_STAGES=str(tmp_path / "stages.txt"),
                GPU_CHECK_IGNORE_MISSING="hypothesis,not_a_real_module_xyz")
    assert p.returncode == 1, p.stdout[-3000:]
    block = _last_block(p.stdout)
    assert "FAIL" in block[0] and "fake:cuda" in block[-2] and "fakework:check" in block[-2]
    report = (out / "report.md").read_text()
    assert "### fake:cuda: FAIL" in report and "planted failure" in report
    assert "### fakework:check: FAIL" in report and "results differ" in report
    assert "needs not_a_real_module_xyz, which is not installed" in report


def test_stage_list(tmp_path):
    fams = gc_stages.parse(str(ROOT / "scripts" / "gpu_check" / "stages.txt"))
    stages = gc_stages.expand(fams)
    names = [s.name for s in stages]
    assert names.index("layer_norm:cuda") < names.index("layer_norm:triton") < names.index("layer_norm:memcheck")
    assert names[-1] == "rest" and stages[-1].optional
    assert "tests/ops/test_layer_norm*.py" in stages[-1].spec["ignore"]
    cuda = stages[names.index("layer_norm:cuda")]
    assert "device" in cuda.spec["select"] and cuda.budget > 0
    bad = tmp_path / "bad.txt"
    bad.write_text("op tests=a.py\nop2 cudaa=3\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        gc_stages.parse(str(bad))


def test_junit_and_sanitizer_parsing(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(textwrap.dedent("""\
        <testsuites><testsuite name="pytest">
          <testcase classname="tests.ops.t" name="test_ok" time="1.5"/>
          <testcase classname="tests.ops.t" name="test_bad" time="0.1"><failure message="boom">E  assert 1 == 2</failure></testcase>
          <testcase classname="tests.ops.t" name="test_gpu" time="0"><skipped message="needs a CUDA GPU: no"/></testcase>
          <testcase classname="tests.ops.t" name="test_cut" time="0"><skipped message="%s"/></testcase>
        </testsuite></testsuites>""" % gc_results.DEADLINE_REASON))
    r = gc_results.pytest_result(str(xml), str(tmp_path / "none.jsonl"))
    assert r["counts"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1, "xfailed": 0, "cut": 1}
    assert r["bad_skips"] == 1 and "assert 1 == 2" in r["failures"][0][1]
    log = tmp_path / "m.log"
    log.write_text("========= COMPUTE-SANITIZER\n========= Invalid __global__ write of size 4 bytes\n"
                   "=========     at void pydl::ln_fwd_cached<float, 4, 2>(...)+0x1d0\n=========\n"
                   "========= ERROR SUMMARY: 1 error\n")
    s = gc_results.parse_sanitizer(str(log))
    assert s["errors"] == 1 and "Invalid __global__ write" in s["first"][0]
    log.write_text("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    assert gc_results.parse_sanitizer(str(log))["errors"] == 0


def test_selection_plugin(tmp_path):
    (tmp_path / "conftest.py").write_text("import pytest\n\n@pytest.fixture\ndef device():\n    return 'cpu'\n")
    (tmp_path / "test_sel.py").write_text(textwrap.dedent("""
        import pytest

        def test_plain(): pass
        def test_uses_device(device): pass
        @pytest.mark.cuda
        def test_cuda(): pass
        @pytest.mark.cuda
        @pytest.mark.triton
        def test_cuda_triton(): pass
        @pytest.mark.cuda
        def test_cuda_stream(): pass
        @pytest.mark.cuda
        @pytest.mark.slow
        def test_cuda_slow(): pass
    """))
    ev = tmp_path / "ev.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts" / "gpu_check"))
    p = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-p", "pytest_gpu_check", "-p",
                        "no:cacheprovider", "--rootdir", str(tmp_path), "--collect-only", "-q",
                        "--gpu-select", "(cuda and not triton) or device", "--gpu-first", "stream",
                        "--gpu-events", str(ev), "-W", "ignore::pytest.PytestUnknownMarkWarning"],
                       capture_output=True, text=True, env=env, timeout=120)
    ids = [ln.split("::")[-1] for ln in p.stdout.splitlines() if "::" in ln]
    assert ids == ["test_cuda_stream", "test_cuda_slow", "test_uses_device", "test_cuda"], p.stdout
    sel = [json.loads(ln) for ln in ev.read_text().splitlines() if '"selected"' in ln][0]
    assert sel["selected"] == 4 and sel["deselected"] == 2

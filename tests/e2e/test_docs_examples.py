"""The examples of README.md and docs/ run as written.

A code block preceded by `<!-- docs-example: KIND -->` is a promise to the reader:
- `shell`: its lines run one after the other with bash, in a fresh folder holding a copy of the
  repository's `jobs/` and `pipeline.yaml` (the README's commands are typed from the repository root);
  each must exit 0.
- `python`: runs with this interpreter in the same folder, after the page's shell examples (it reads
  what they wrote).
- `job`: a job file; it must pass the job validation that `cogbatch run` does before any work.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = re.compile(r"<!-- docs-example: (\w+) -->\n```\w*\n(.*?)```", re.S)


def examples(kind: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, m in enumerate(MARK.finditer(page.read_text())):
            if m.group(1) == kind:
                found.append((f"{page.relative_to(REPO)}#{i}", m.group(2)))
    return found


def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "checkout"
    shutil.copytree(REPO / "jobs", work / "jobs")
    shutil.copy(REPO / "pipeline.yaml", work / "pipeline.yaml")
    return work


def test_the_pages_have_examples_of_every_kind():
    # A renamed marker would silently turn the tests below into no-ops.
    assert {kind for kind in ("shell", "python", "job") if examples(kind)} == {"shell", "python", "job"}
    kinds = {m.group(1) for page in PAGES for m in MARK.finditer(page.read_text())}
    assert kinds <= {"shell", "python", "job"}, f"unknown example kinds: {kinds}"


@pytest.mark.slow
def test_shell_then_python_examples_run_as_written(tmp_path):
    work = workdir(tmp_path)
    exe = shutil.which("cogbatch")
    assert exe, "the cogbatch command is not installed"
    for where, block in examples("shell"):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if not command:
                continue
            command = re.sub(r"^cogbatch\b", exe, command)
            res = subprocess.run(["bash", "-c", command], cwd=work, capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, f"{where}: `{command}` exited {res.returncode}:\n{res.stderr[-2000:]}"
    for where, block in examples("python"):
        res = subprocess.run([sys.executable, "-c", block], cwd=work, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{where}: exited {res.returncode}:\n{res.stderr[-2000:]}"


def test_job_examples_pass_the_job_validation(tmp_path, monkeypatch):
    from cogbatch.job import load_job

    work = workdir(tmp_path)
    (work / "images").mkdir()
    monkeypatch.chdir(work)  # relative paths in a job are relative to where cogbatch runs
    jobs = examples("job")
    for i, (where, block) in enumerate(jobs):
        path = work / f"example-{i}.yaml"
        path.write_text(block)
        cfg = load_job(path, pipeline=work / "pipeline.yaml")
        assert cfg.tasks, where

"""Every code block of README.md and docs/ runs, or says why it cannot.

Python blocks run in order, one fresh namespace per file (a page reads like
a session), in one subprocess with 4 simulated CPU devices. A block that
cannot run here is marked in the Markdown on the line before its fence:

    <!-- not-run: the reason -->

Other languages are never run; each has its reason in ``NOT_RUN``. The
docstrings' ``>>>`` examples of every public name run as doctests.
"""

import doctest
import json
import os
import pathlib
import re
import subprocess
import sys
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEVICES = 4
# Languages whose blocks are never run, and why.
NOT_RUN = {
  "bash": "shell commands: installs, builds, launches and scripts; CI "
  "runs scripts/test.sh and scripts/docs.sh themselves",
  "text": "sample output, not code",
}
_FENCE = re.compile(r"^(`{3,})(.*)$")
_MARK = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->$")
_ID = re.compile(r"\bB-[A-Z]+-\d+\b")


def _pages() -> list[pathlib.Path]:
  docs = sorted(
    p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts
  )
  return [ROOT / "README.md"] + docs


def _blocks(path: pathlib.Path) -> list[dict]:
  """Fenced blocks: language, first line number, code, not-run reason."""
  blocks, lines = [], path.read_text().splitlines()
  i = 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    fence, info = m.group(1), m.group(2).strip()
    end = i + 1
    while end < len(lines) and not lines[end].startswith(fence):
      end += 1
    prev = lines[i - 1].strip() if i else ""
    mark = _MARK.match(prev)
    blocks.append(
      {
        "file": str(path.relative_to(ROOT)),
        "line": i + 1,
        "lang": info.split()[0] if info else "",
        "code": "\n".join(lines[i + 1 : end]),
        "not_run": mark.group(1) if mark else None,
      }
    )
    i = end + 1
  return blocks


def _all_blocks() -> list[dict]:
  # MyST directives ({toctree}, {eval-rst}, {include}) are not code.
  return [
    b for p in _pages() for b in _blocks(p) if not b["lang"].startswith("{")
  ]


_BLOCKS = _all_blocks()
_PYTHON = [b for b in _BLOCKS if b["lang"] == "python" and not b["not_run"]]


def _id(block) -> str:
  return f"{block['file']}:{block['line']}"


@pytest.fixture(scope="module")
def results() -> dict:
  """Runs every Python block once, in one subprocess; results by block id."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run(
    [sys.executable, __file__, "run"],
    input=json.dumps(_PYTHON),
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=600,
    check=False,
  )
  last = proc.stdout.strip().splitlines()[-1:] or [""]
  try:
    return json.loads(last[0])
  except json.JSONDecodeError:
    pytest.fail(
      f"the snippet runner crashed:\n{proc.stdout[-3000:]}\n"
      f"{proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize("block", _PYTHON, ids=_id)
def test_python_block_runs(block, results):
  error = results.get(_id(block), "not run")
  assert error is None, f"{_id(block)}:\n{block['code']}\n\n{error}"


@pytest.mark.parametrize(
  "block",
  [b for b in _BLOCKS if b["lang"] != "python" or b["not_run"]],
  ids=_id,
)
def test_block_not_run_has_a_reason(block):
  if block["lang"] == "python":
    assert len(block["not_run"]) > 10, "say why it cannot run"
  else:
    assert block["lang"] in NOT_RUN, (
      f"{_id(block)}: a ```{block['lang'] or '(no language)'} block: run "
      f"it (```python) or give its language a reason in NOT_RUN"
    )


def test_snippets_were_found():
  files = {b["file"] for b in _PYTHON}
  assert {"README.md", "docs/getting_started.md", "docs/guide.md"} <= files


def test_docstring_examples_of_public_names_run():
  import gqsgd_jax  # pylint: disable=g-import-not-at-top

  finder = doctest.DocTestFinder(recurse=False)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  examples = 0
  for name in gqsgd_jax.__all__:
    obj = getattr(gqsgd_jax, name)
    for test in finder.find(obj, name, globs={}):
      examples += len(test.examples)
      runner.run(test)
  assert examples > 0
  assert runner.failures == 0, f"{runner.failures} docstring example(s) fail"


def test_api_reference_covers_every_public_name():
  import gqsgd_jax  # pylint: disable=g-import-not-at-top

  api = (ROOT / "docs" / "api.md").read_text()
  documented = set(re.findall(r"::\s+gqsgd_jax\.(\w+)", api))
  assert set(gqsgd_jax.__all__) <= documented, sorted(
    set(gqsgd_jax.__all__) - documented
  )


def test_every_difference_id_in_the_code_is_defined():
  used = set()
  for folder in ("gqsgd_jax", "xla_ffi", "tests", "examples", "benchmarks"):
    for path in (ROOT / folder).rglob("*"):
      if path.suffix in (".py", ".h", ".cc", ".cu", ".md") and (
        path != pathlib.Path(__file__).resolve()
      ):
        used |= set(_ID.findall(path.read_text(errors="ignore")))
  page = (ROOT / "docs" / "differences.md").read_text()
  defined = set(re.findall(r"^### (B-[A-Z]+-\d+)$", page, re.M))
  assert used, "no ids found: the search is broken"
  assert used <= defined, sorted(used - defined)


def test_user_docs_stand_on_their_own():
  for path in _pages():
    text = path.read_text()
    assert "shared/" not in text and "ALGORITHMS.md" not in text, path


def _run(blocks: list[dict]) -> dict:
  """Subprocess side: exec each block; None or the traceback per block."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_num_cpu_devices", DEVICES)
  out, namespaces = {}, {}
  for block in blocks:
    ns = namespaces.setdefault(block["file"], {"__name__": "__docs__"})
    try:
      exec(compile(block["code"], _id(block), "exec"), ns)  # pylint: disable=exec-used
      out[_id(block)] = None
    except Exception:  # pylint: disable=broad-except
      out[_id(block)] = traceback.format_exc(limit=-3)
  return out


if __name__ == "__main__" and sys.argv[1:] == ["run"]:
  print(json.dumps(_run(json.loads(sys.stdin.read()))))

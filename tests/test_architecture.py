"""The layering of the code, as a test: import-linter's contracts (pyproject.toml,
`[tool.importlinter]`) and the gateway's process staying free of the engine libraries."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_import_linter_contracts_hold():
    lint = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert lint.returncode == 0, lint.stdout[-4000:] + lint.stderr[-2000:]
    # Every contract ran and was kept (a contract that silently stopped matching would not be listed).
    assert "6 kept, 0 broken" in lint.stdout, lint.stdout[-2000:]


def test_the_gateway_module_imports_no_engine_library():
    """What a gateway replica loads: Serve imports `cluster.gateway` to build the ingress."""
    code = (
        "import json, sys; import cluster.gateway; "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'xgrammar', 'sglang', 'lmdeploy') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []

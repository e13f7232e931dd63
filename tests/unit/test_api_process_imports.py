"""The API process stays free of torch (~200 MB of memory) unless a request needs it."""

from __future__ import annotations

import subprocess
import sys


def test_server_and_constraint_validation_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import tessera.api.server, tessera.core.engine.structured_output, tessera.core.engine.core_client\n"
        "loaded = sorted(m for m in ('torch', 'xgrammar', 'llguidance', 'outlines_core') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

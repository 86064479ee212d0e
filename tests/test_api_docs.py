"""The public API is documented, and docs/api.md is what its docstrings say
(scripts/api_reference.py writes it)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import api_reference  # noqa: E402


def test_every_public_name_has_its_parameter_and_return_sections():
    assert api_reference.missing_sections() == []


def test_the_api_reference_page_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

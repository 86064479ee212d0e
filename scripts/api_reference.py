"""Writes docs/api.md, the API reference, from the docstrings of the public names
(``dcq_ops.__all__`` and ``dcq_ops.training.__all__``), so that the reference cannot
drift from the code: ``--check`` exits 1 when docs/api.md is not what the code says
(the test suite runs it), and ``missing_sections()`` lists the public callables whose
docstring lacks a Parameters or Returns section.

    python scripts/api_reference.py            # rewrite docs/api.md
    python scripts/api_reference.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "api.md"
MODULES = ("dcq_ops", "dcq_ops.training")

HEADER = """# API reference

Generated from the docstrings by `python scripts/api_reference.py` (a test checks
that this page is what the code says). The library is `dcq_ops`; the training
application is `dcq_ops.training`. The loss itself is defined in
[loss.md](loss.md).
"""


def public_names(module) -> list[str]:
    return sorted(module.__all__, key=str.lower)


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _takes_parameters(func) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name not in ("self", "cls") for p in params)


def _returns_something(func) -> bool:
    """Whether a callable is documented as returning a value: its annotation is not None."""
    try:
        annotation = inspect.signature(func).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation not in (None, "None", inspect.Signature.empty)


def public_methods(cls) -> list[tuple[str, object]]:
    """The methods and properties a class defines itself (not those of nn.Module or object)."""
    members = []
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isfunction(member) or isinstance(member, property):
            members.append((name, member))
    return members


def missing_sections() -> list[str]:
    """'module.name: what is missing' for every public callable whose docstring lacks the
    Parameters section (it takes parameters) or the Returns section (it returns a value)."""
    problems = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in public_names(module):
            obj = getattr(module, name)
            where = f"{module_name}.{name}"
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            if not doc:
                problems.append(f"{where}: no docstring")
                continue
            if inspect.isclass(obj):
                init = vars(obj).get("__init__")
                # A dataclass documents its fields as Attributes (they are its constructor's parameters).
                sections = ("Attributes", "Parameters") if dataclasses.is_dataclass(obj) else ("Parameters",)
                if init is not None and _takes_parameters(init) and not any(s in doc for s in sections):
                    problems.append(f"{where}: no {' or '.join(sections)} section (its constructor takes arguments)")
                for method_name, method in public_methods(obj):
                    if method_name == "__init__":
                        continue
                    method_doc = inspect.getdoc(method) or ""
                    if not method_doc:
                        problems.append(f"{where}.{method_name}: no docstring")
                continue
            if _takes_parameters(obj) and "Parameters" not in doc:
                problems.append(f"{where}: no Parameters section")
            if _returns_something(obj) and "Returns" not in doc:
                problems.append(f"{where}: no Returns section")
    return problems


def render() -> str:
    parts = [HEADER]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        parts.append(f"\n## `{module_name}`\n")
        summary = (inspect.getdoc(module) or "").split("\n\n")[0]
        if summary:
            parts.append(summary + "\n")
        for name in public_names(module):
            obj = getattr(module, name)
            if inspect.isclass(obj):
                parts.append(f"\n### class `{name}{_signature(obj)}`\n")
                parts.append((inspect.getdoc(obj) or "") + "\n")
                for method_name, method in public_methods(obj):
                    if method_name == "__init__":
                        continue
                    if isinstance(method, property):
                        parts.append(f"\n#### property `{name}.{method_name}`\n")
                    else:
                        parts.append(f"\n#### `{name}.{method_name}{_signature(method)}`\n")
                    parts.append((inspect.getdoc(method) or "") + "\n")
            elif callable(obj):
                parts.append(f"\n### `{name}{_signature(obj)}`\n")
                parts.append((inspect.getdoc(obj) or "") + "\n")
            else:
                parts.append(f"\n### `{name}`\n")
                parts.append(f"A constant: `{obj!r}`.\n" if not isinstance(obj, str) or len(obj) < 80
                             else "A constant (a message string, or None).\n")
    return "".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run `python scripts/api_reference.py`",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

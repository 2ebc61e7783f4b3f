"""Rules of the codebase that a test can hold: views go through gates, pure modules stay pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VIEW_MODULES = ["broker/apis.py", "broker/views.py", "consent/apis.py"]
PURE_MODULES = [
    "broker/dicom/kos.py",
    "broker/dicom/archive.py",
    "broker/dicom/network.py",
    "consent/policy.py",
    "sharing/tokens.py",
    "audit/chain.py",
    "audit/types.py",
    "audit/events.py",
]


@pytest.mark.parametrize("module", VIEW_MODULES)
def test_views_reach_models_only_through_gates_selectors_and_services(module):
    tree = ast.parse((ROOT / module).read_text())
    direct = [
        f"{module}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "objects"
    ]
    assert direct == [], "views must not query models directly: " + ", ".join(direct)


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_import_no_django(module):
    tree = ast.parse((ROOT / module).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "django" not in imported
    assert "rest_framework" not in imported

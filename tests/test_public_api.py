"""The public surface: a rename must break a test, not a user's launch script."""

import importlib
import inspect
import subprocess
import sys

import slime_xvocab
from slime_xvocab.cli import SUBCOMMANDS


def test_all_lists_importable_names():
    assert slime_xvocab.__all__ == sorted(slime_xvocab.__all__[:-1]) + ["__version__"]
    for name in slime_xvocab.__all__:
        assert getattr(slime_xvocab, name) is not None, name


def test_plugin_imports_without_slime_ray_sglang_megatron():
    code = (
        "import sys, slime_xvocab.hooks, slime_xvocab.data_source, slime_xvocab.teacher_view, "
        "slime_xvocab.teacher_client, slime_xvocab.alignment, slime_xvocab.credit, slime_xvocab.config;"
        "bad = [m for m in ('slime', 'ray', 'sglang', 'megatron') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_subcommand_has_cli_main():
    for name, (module, _) in SUBCOMMANDS.items():
        fn = importlib.import_module(module).cli_main
        assert list(inspect.signature(fn).parameters) == ["argv"], name


def test_cli_help_and_unknown_command():
    ok = subprocess.run([sys.executable, "-m", "slime_xvocab.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and all(name in ok.stdout for name in SUBCOMMANDS)
    bad = subprocess.run([sys.executable, "-m", "slime_xvocab.cli", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr

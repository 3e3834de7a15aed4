"""`import aoe` stays light (no transformers, no torch._dynamo) and still registers the HF classes;
loading and exporting models never imports the trainer."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

_CHECK_AUTO = ("from transformers import AutoConfig, AutoModelForCausalLM\n"
               "cfg = AutoConfig.for_model('aoe', vocab_size=64)\n"
               "print(type(cfg).__name__, type(AutoModelForCausalLM.from_config(cfg)).__name__)\n")


def _run(code: str) -> list[str]:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    if "PYTHONPATH" in os.environ:  # the package under test, where it is not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[:-1]


def test_import_aoe_is_light_and_transformers_imported_later_knows_aoe():
    lines = _run("import sys, aoe\nprint('transformers' in sys.modules, 'torch._dynamo' in sys.modules)\n" + _CHECK_AUTO
                 + "import aoe.io, aoe.hf.export, aoe.hf.commands, aoe.eval.multiple_choice\n"
                 + "print('loading needs the trainer:', 'aoe.train' in sys.modules)\n")
    assert lines == ["False False", "AoEConfig AoEForCausalLM", "loading needs the trainer: False"]


def test_transformers_imported_first_knows_aoe_too():
    assert _run("import transformers, aoe\n" + _CHECK_AUTO) == ["AoEConfig AoEForCausalLM"]


def test_a_failing_registration_does_not_break_importing_transformers():
    code = ("import sys, warnings, aoe\nsys.modules['aoe.hf'] = None  # importing it now fails\n"
            "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
            "    import transformers\n"
            "print(any('could not register' in str(w.message) for w in caught), hasattr(transformers, 'AutoConfig'))\n")
    assert _run(code) == ["True True"]


@pytest.mark.parametrize("command", ["", "train", "eval", "generate", "export", "convert"])
def test_help_imports_neither_torch_nor_transformers(command):
    code = ("import sys\nfrom aoe.cli import main\ntry:\n    main([" + (f"{command!r}, " if command else "")
            + "'--help'])\nexcept SystemExit:\n    pass\n"
              "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    lines = _run(code)
    assert lines[-1] == "False False" and any("usage: aoe" in line for line in lines)

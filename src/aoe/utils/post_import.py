"""Run a callback once a module is imported, without importing it: ``when_imported(name, fn)``.

``import aoe`` uses it to register its Hugging Face classes with transformers' Auto classes as soon
as transformers is imported, by the user or by a library, instead of importing transformers itself
(several seconds) for users who only want the layers. If the module is already imported, ``fn``
runs at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """A finder that lets the real finders find ``name``, then runs ``callback`` after the module's
    code has executed. It removes itself on first use."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module, callback = spec.loader.exec_module, self.callback

        def exec_module(module):
            run_module(module)
            callback()

        spec.loader.exec_module = exec_module  # this spec's loader instance only
        return spec


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` right after the top-level module ``name`` is first imported (now, if it
    already is)."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImportFinder(name, callback))

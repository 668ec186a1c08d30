"""Where ``hcmemory.kernels`` and ``hcmemory.integrations`` come from when hcmemory runs from a checkout.

The design card keeps ``kernels/`` and ``integrations/`` as top-level folders that ship inside the
package (setuptools ``package-dir``): a wheel holds them as ``hcmemory/kernels`` and
``hcmemory/integrations``.  In a checkout they sit beside ``hcmemory/``, and neither may ever be found
as a top-level package: Hugging Face's kernel hub, which transformers imports, is called ``kernels``,
and ``python -c``, ``python -m pytest`` or a REPL put the checkout's root first on ``sys.path``.  So
neither folder has an ``__init__.py`` (a folder without one never wins over an installed package of the
same name), and this finder maps exactly these two names onto them as namespace packages.  It is
installed only where the package's own folder lacks them, i.e. in a checkout or an editable install.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
SHIPPED = ("kernels", "integrations")
"""The folders beside ``hcmemory/`` that ship as its subpackages."""


class CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds ``hcmemory.<folder>`` for the shipped folders of a checkout, and nothing else."""

    def __init__(self, root: Path) -> None:
        self.folders = {f"{__package__}.{name}": root / name for name in SHIPPED if (root / name).is_dir()}

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec


def install() -> None:
    """Map the shipped folders when this package runs from a checkout (they are not inside it)."""
    if any((_PACKAGE / name).is_dir() for name in SHIPPED):
        return
    if not any(isinstance(finder, CheckoutFolders) for finder in sys.meta_path):
        sys.meta_path.append(CheckoutFolders(_PACKAGE.parent))

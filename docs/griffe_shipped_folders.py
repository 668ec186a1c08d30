"""A Griffe extension for the API reference: ``hcmemory.kernels`` and ``hcmemory.integrations``.

In a checkout these two subpackages are the top-level folders ``kernels/`` and ``integrations/``, shipped
inside ``hcmemory`` by setuptools ``package-dir`` (see ``hcmemory/folders.py``).  Griffe, which
mkdocstrings uses to read the code, finds a package's submodules only inside its folder, so this
extension adds the shipped folders (their names are read from ``hcmemory.folders.SHIPPED``) to the
``hcmemory`` package it loaded, visiting their modules statically like any other.  In an installed wheel
the folders are inside ``hcmemory/`` already and nothing is added.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import griffe


class ShippedFolders(griffe.Extension):
    """Adds ``hcmemory.<folder>`` for each folder of ``hcmemory.folders.SHIPPED`` beside the package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "hcmemory" or not isinstance(pkg.filepath, Path):
            return
        shipped = ast.literal_eval(str(pkg["folders"]["SHIPPED"].value))
        root = pkg.filepath.parent.parent
        for name in shipped:
            folder = root / name
            if name in pkg.members or not folder.is_dir():
                continue
            sub = griffe.Module(name, filepath=[folder], parent=pkg, lines_collection=loader.lines_collection,
                                modules_collection=loader.modules_collection)
            pkg.set_member(name, sub)
            for path in sorted(folder.glob("*.py")):
                code = path.read_text(encoding="utf-8")
                loader.lines_collection[path] = code.splitlines()
                module = griffe.visit(path.stem, filepath=path, code=code, parent=sub, extensions=loader.extensions,
                                      docstring_parser=loader.docstring_parser,
                                      docstring_options=loader.docstring_options,
                                      lines_collection=loader.lines_collection,
                                      modules_collection=loader.modules_collection)
                sub.set_member(path.stem, module)

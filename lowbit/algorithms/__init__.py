"""lowbit.algorithms: one module per method. Each registers its config, handler and schemes on import.

Modules are discovered with pkgutil, so adding a method means adding a file.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

"""Opacus's modules without the package __init__s that load all of Opacus; import this before any `opacus` module.

`import opacus.grad_sample` first runs opacus/__init__.py, which imports the PrivacyEngine and with it every
accountant (GDP and PRV need scipy.stats), data loader and module validator; opacus/accountants/__init__.py does the
same for `opacus.accountants.analysis.rdp`, and opacus/optimizers/__init__.py imports every optimizer (the FSDP ones
pull in torch.distributed checkpointing) for `opacus.optimizers.optimizer`. fedrec uses Opacus's per-sample gradients,
DP optimizers and RDP analysis, never the PrivacyEngine, and a deployed device pays every import once per train
message (Flower 1.42 starts a fresh ClientApp process per message): measured here after torch, a plain `import opacus`
takes 1.39 s and `import fedrec.shared.training` 0.58 s (docs/deploy.md, Costs).

Importing this module puts those packages into `sys.modules` with their __init__ deferred, not skipped: the modules
below them import as usual (each other subpackage's own __init__ runs, so every grad sampler registers), and the
first read of an attribute the package itself defines (`from opacus import PrivacyEngine`, `opacus.__version__`) runs
the real __init__ there and then. A package already imported is left as it is.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from typing import Any

DEFERRED = ("opacus", "opacus.accountants", "opacus.optimizers")  # parents first: finding one imports its parent

_lock = threading.RLock()


def defer_package_init(name: str) -> None:
    """Register package `name` with its __init__ not yet run; it runs on the first read of a missing attribute."""
    with _lock:
        if name in sys.modules:
            return
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            raise ImportError(f"{name} is not an installed package (fedrec needs opacus==1.6.*)")
        if name in sys.modules:  # finding it imported its parent, which may have imported it meanwhile
            return
        module = importlib.util.module_from_spec(spec)
        running: set[int] = set()  # the thread inside the __init__, whose own reads must fall through

        def run_init(attribute: str) -> Any:
            with _lock:  # another thread waits for the __init__ to finish, as it would for a plain import
                if module.__dict__.get("__getattr__") is run_init and threading.get_ident() not in running:
                    running.add(threading.get_ident())
                    try:
                        spec.loader.exec_module(module)  # type: ignore[union-attr]
                    finally:
                        running.clear()
                    del module.__getattr__  # only once it succeeded: a failed __init__ is retried on the next read
            try:
                return module.__dict__[attribute]
            except KeyError:
                raise AttributeError(f"module {name!r} has no attribute {attribute!r}") from None

        module.__getattr__ = run_init  # type: ignore[method-assign]
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


for _name in DEFERRED:
    defer_package_init(_name)

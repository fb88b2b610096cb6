"""Register Endor with transformers' `from_pretrained` without importing transformers.

Registering needs `transformers.quantizers.auto`, which pulls in most of transformers and took
15.6 s to import on our loaded 2-core machine against 7.4 s for `import endor` (torch included):
far too heavy for `import endor`. Any `from_pretrained` imports that module first (modeling_utils
imports `get_hf_quantizer` from it), so we wait for it: a finder on `sys.meta_path` sees the
import start, lets the normal loader run it, and registers right after. If it is already
imported, we register at once."""

from __future__ import annotations

import sys
import warnings

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from .hf_quantizer import register
        register()
    except Exception as e:  # never break `import transformers` for the user
        warnings.warn(f"endor: could not register with transformers' from_pretrained ({e}); "
                      "Endor checkpoints will not load through it", stacklevel=2)


class _RegisterAfterImport:  # a sys.meta_path finder (importlib.abc costs 25 ms to import)
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, finder_self = spec.loader, self

        class _Loader:
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                finder_self.uninstall()
                _register()

            def __getattr__(self, name):  # get_source, get_filename... (tracebacks, inspect)
                return getattr(loader, name)

        spec.loader = _Loader()
        return spec

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Called by `import endor`: register now if transformers' quantizers are loaded, else when
    they are."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())

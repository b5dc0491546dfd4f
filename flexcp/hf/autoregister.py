"""Register ``attn_implementation="magi"`` by itself: once transformers' attention registries exist.

transformers has no entry point for attention backends (only ``AttentionInterface.register``
at run time), so forgetting :func:`flexcp.magi_attn_utils.register_magi_attention` used to
end in transformers' own "not supported" error. ``import flexcp`` calls :func:`install`:
if transformers' two registries (``modeling_utils``, ``masking_utils``) are already
imported it registers at once; otherwise a one-shot import hook registers right after the
later of the two finishes loading. Nothing imports transformers early (it is slow to
import); the hook leaves every other import alone and removes itself once both loaded.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings

WATCHED = ("transformers.modeling_utils", "transformers.masking_utils")
"""The modules that define ``AttentionInterface`` and ``AttentionMaskInterface``."""
_DEFINES = {"transformers.modeling_utils": "AttentionInterface", "transformers.masking_utils": "AttentionMaskInterface"}


def _loaded() -> bool:
    return all(hasattr(sys.modules.get(name), _DEFINES[name]) for name in WATCHED)


def _register() -> None:
    """Register "magi" if both registries are loaded; a failure becomes a warning naming the fix."""
    if not _loaded():
        return
    try:
        from .attention import register_magi_attention

        register_magi_attention()
    except Exception as exc:  # never break the user's import of transformers
        warnings.warn(f"flexcp could not register attn_implementation='magi' in transformers ({exc!r}); call "
                      "flexcp.magi_attn_utils.register_magi_attention() before loading the model", stacklevel=2)


class _RegisterAfterLoad(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a watched module so that registration runs after it."""

    def find_spec(self, name: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if name not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            if all(n in sys.modules for n in WATCHED) and self in sys.meta_path:
                sys.meta_path.remove(self)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now if transformers' registries are loaded, else once they are (idempotent, no import)."""
    if _loaded():
        _register()
    elif not any(isinstance(f, _RegisterAfterLoad) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLoad())


__all__ = ["WATCHED", "install"]

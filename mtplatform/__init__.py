"""mtplatform: multi-task text-to-text training in PyTorch on seqio.

Importing the package makes every gin configurable it declares known to gin: the first time gin meets a name it does
not know (a binding, a reference, a query), every module of the package is imported and the name looked up again.
The modules load torch and TensorFlow (3 to 15 s), so they load when a configuration needs them and not for
`mtp --help`, `mtp report` or `mtp export`, which read none."""

import importlib
import pkgutil

from gin import config as _gin_config
from gin import selector_map as _selector_map

__version__ = "0.1.0"

_registered = False


def register_configurables() -> None:
    """Import every module of the package, so that each gin configurable exists before a gin file binds it; a new
    module's configurables need no list kept by hand. The CLI calls it once TensorFlow's C++ log level is set
    (`tf_setup`, from `--verbose`); otherwise gin's first unknown name calls it (below)."""
    global _registered
    _registered = True  # first: the imports register names, and must not come back here
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


class _RegisteringSelectorMap(_selector_map.SelectorMap):
    """gin's registry, which registers the package's configurables on the first name it cannot match. gin offers no
    hook for an unknown name, and every lookup of a partial name (`get_match`, the skip-unknown check) goes through
    `matching_selectors`, so that is the one method to extend."""

    def matching_selectors(self, partial_selector: str) -> list[str]:
        found = super().matching_selectors(partial_selector)
        if not found and not _registered:
            register_configurables()
            found = super().matching_selectors(partial_selector)
        return found


# The registry object gin's functions share (and seqio's configurables already sit in) keeps its contents; only
# its class changes, to the subclass above, which adds behaviour and no state.
_gin_config._REGISTRY.__class__ = _RegisteringSelectorMap

"""mtplatform: multi-task text-to-text training in PyTorch on seqio."""

import importlib
import pkgutil

__version__ = "0.1.0"


def register_configurables() -> None:
    """Import every module of the package, so that each gin configurable exists before a gin file binds it; a new
    module's configurables need no list kept by hand. Not done at `import mtplatform` itself: the modules load
    TensorFlow, whose C++ log level must be set before it loads (`tf_setup`, from the CLI's `--verbose`)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")

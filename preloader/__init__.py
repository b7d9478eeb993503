"""preloader: make model weights resident in the Linux page cache, and prove it.

The public surface: :func:`warm`, :func:`residency`, :func:`evict` and :func:`plan`, the
memory budget (:func:`memory_budget`, :func:`check_budget`), pinning (:func:`pin`), the
report types they return, and the exit codes the CLI uses.

Importing the package imports nothing but its version: each name is loaded from its
module on first use (PEP 562), so ``preloader --version`` and the short commands pay
only for what they run.
"""

import sys
import typing

from ._version import __version__ as __version__

if typing.TYPE_CHECKING:
    from .api import check_budget as check_budget
    from .api import evict as evict
    from .api import memory_budget as memory_budget
    from .api import pin as pin
    from .api import plan as plan
    from .api import residency as residency
    from .api import warm as warm
    from .budget import BudgetCheck as BudgetCheck
    from .budget import MemoryBudget as MemoryBudget
    from .engine import EngineEvent as EngineEvent
    from .engine import FileResidency as FileResidency
    from .engine import FileResult as FileResult
    from .engine import ResidencyReport as ResidencyReport
    from .engine import WarmOptions as WarmOptions
    from .engine import WarmProgress as WarmProgress
    from .engine import WarmReport as WarmReport
    from .pinning import PinSet as PinSet
    from .planner import Chunk as Chunk
    from .planner import FileSpec as FileSpec
    from .planner import Plan as Plan
    from .planner import Skipped as Skipped

_HOMES = {
    "check_budget": "api",
    "evict": "api",
    "memory_budget": "api",
    "pin": "api",
    "plan": "api",
    "residency": "api",
    "warm": "api",
    "BudgetCheck": "budget",
    "MemoryBudget": "budget",
    "EngineEvent": "engine",
    "FileResidency": "engine",
    "FileResult": "engine",
    "ResidencyReport": "engine",
    "WarmOptions": "engine",
    "WarmProgress": "engine",
    "WarmReport": "engine",
    "PinSet": "pinning",
    "Chunk": "planner",
    "FileSpec": "planner",
    "Plan": "planner",
    "Skipped": "planner",
}

__all__ = [
    "BudgetCheck",
    "Chunk",
    "EngineEvent",
    "FileResidency",
    "FileResult",
    "FileSpec",
    "MemoryBudget",
    "PinSet",
    "Plan",
    "ResidencyReport",
    "Skipped",
    "WarmOptions",
    "WarmProgress",
    "WarmReport",
    "__version__",
    "check_budget",
    "evict",
    "memory_budget",
    "pin",
    "plan",
    "residency",
    "warm",
]


def __getattr__(name: str) -> typing.Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # __import__ rather than importlib.import_module, so `-X importtime` sees it.
    module = f"{__name__}.{home}"
    __import__(module)
    value = getattr(sys.modules[module], name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

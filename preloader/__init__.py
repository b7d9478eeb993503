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

from ._version import __version__

if typing.TYPE_CHECKING:
    from .api import check_budget as check_budget
    from .api import evict as evict
    from .api import memory_budget as memory_budget
    from .api import pin as pin
    from .api import plan as plan
    from .api import residency as residency
    from .api import warm as warm
    from .engine.events import EngineEvent as EngineEvent
    from .engine.reports import FileResidency as FileResidency
    from .engine.reports import FileResult as FileResult
    from .engine.reports import ResidencyReport as ResidencyReport
    from .engine.reports import WarmProgress as WarmProgress
    from .engine.reports import WarmReport as WarmReport
    from .kernel.pinning import PinSet as PinSet
    from .planning.budget import BudgetCheck as BudgetCheck
    from .planning.budget import MemoryBudget as MemoryBudget
    from .planning.planner import Plan as Plan
    from .planning.specs import Chunk as Chunk
    from .planning.specs import FileSpec as FileSpec
    from .planning.specs import Skipped as Skipped
    from .settings import WarmOptions as WarmOptions

_HOMES = {
    "check_budget": "api",
    "evict": "api",
    "memory_budget": "api",
    "pin": "api",
    "plan": "api",
    "residency": "api",
    "warm": "api",
    "BudgetCheck": "planning.budget",
    "MemoryBudget": "planning.budget",
    "EngineEvent": "engine.events",
    "FileResidency": "engine.reports",
    "FileResult": "engine.reports",
    "ResidencyReport": "engine.reports",
    "WarmOptions": "settings",
    "WarmProgress": "engine.reports",
    "WarmReport": "engine.reports",
    "PinSet": "kernel.pinning",
    "Chunk": "planning.specs",
    "FileSpec": "planning.specs",
    "Plan": "planning.planner",
    "Skipped": "planning.specs",
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

"""preloader: make model weights resident in the Linux page cache, and prove it.

The public surface: :func:`warm`, :func:`residency`, :func:`evict` and :func:`plan`, the
report types they return, and the exit codes the CLI uses.
"""

from ._version import __version__ as __version__
from .api import evict as evict
from .api import plan as plan
from .api import residency as residency
from .api import warm as warm
from .engine import EngineEvent as EngineEvent
from .engine import FileResidency as FileResidency
from .engine import FileResult as FileResult
from .engine import ResidencyReport as ResidencyReport
from .engine import WarmOptions as WarmOptions
from .engine import WarmProgress as WarmProgress
from .engine import WarmReport as WarmReport
from .planner import Chunk as Chunk
from .planner import FileSpec as FileSpec
from .planner import Plan as Plan
from .planner import Skipped as Skipped

__all__ = [
    "Chunk",
    "EngineEvent",
    "FileResidency",
    "FileResult",
    "FileSpec",
    "Plan",
    "ResidencyReport",
    "Skipped",
    "WarmOptions",
    "WarmProgress",
    "WarmReport",
    "__version__",
    "evict",
    "plan",
    "residency",
    "warm",
]

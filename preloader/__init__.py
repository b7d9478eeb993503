"""preloader: make model weights resident in the page cache."""

from ._version import __version__ as __version__

"""mkdocs hooks: the site's front page is README.md itself, its links made the site's.

README.md links into ``docs/`` (``docs/serve.md``) and to ``CHANGELOG.md``; on the site
those pages sit beside the front page. Keeping one text means the two cannot drift.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_README = Path(__file__).resolve().parent.parent / "README.md"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Serve README.md, with its links rewritten, as ``index.md``."""
    if page.file.src_uri != "index.md":
        return markdown
    text = _README.read_text(encoding="utf-8")
    text = re.sub(r"\]\(docs/", "](", text)
    text = text.replace("](CHANGELOG.md)", "](changelog.md)")
    return text.replace(
        "The full documentation is a site in `docs/` (`pip install -e '.[docs]' && mkdocs serve`):",
        "The pages of this site:",
    )

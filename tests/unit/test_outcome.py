"""The ``--json`` document: streamed lists read exactly as ``json.dumps`` writes them."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from preloader.cli.outcome import JsonItems, print_json

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@given(
    st.dictionaries(
        st.text(max_size=6),
        st.tuples(st.booleans(), st.lists(JSON_VALUES, max_size=2100)),
        max_size=4,
    )
)
def test_a_streamed_document_is_the_json_dumps_line(
    fields: dict[str, tuple[bool, list[object]]],
) -> None:
    document = {key: items for key, (_, items) in fields.items()}
    streamed: dict[str, object] = {
        key: JsonItems(lambda items=items: iter(items)) if lazy else items
        for key, (lazy, items) in fields.items()
    }
    assert _printed(streamed) == json.dumps(document) + "\n"


def _printed(document: dict[str, object]) -> str:
    # redirect_stdout, not capsys: capsys is function-scoped and hypothesis runs many
    # examples per call.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_json(document)
    return out.getvalue()


def test_a_streamed_list_is_read_once_item_by_item() -> None:
    seen: list[int] = []

    def items() -> Iterator[dict[str, int]]:
        for number in range(3000):
            seen.append(number)
            yield {"n": number}

    text = _printed({"files": JsonItems(items), "bytes": 1})
    assert json.loads(text) == {"files": [{"n": n} for n in range(3000)], "bytes": 1}
    assert seen == list(range(3000))

"""Model formats: warm what the inference server will load, in the order it loads it.

A model folder often holds more than a server reads: the same weights as safetensors
and as PyTorch pickles, Meta's ``original/`` consolidated checkpoint, ``.git`` objects,
half-finished downloads, or several GGUF quantisations of which llama.cpp loads one.
The planner walks the tree, then asks :func:`arrange` which of the walked files to keep
and in which order; :func:`default_skip` is consulted during the walk so that whole
folders like ``.git/`` are never entered.

:func:`arrange` is pure: reading a safetensors index and asking whether a file exists are
passed in, so the rules are tested on names alone and, through the planner, on real trees.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..kernel import pagecache
from ..kernel.fileread import OPEN_FLAGS

__all__ = [
    "DEFAULT_SKIP_DIRS",
    "DEFAULT_SKIP_SUFFIXES",
    "DUPLICATE_FORMAT_SUFFIXES",
    "Arrangement",
    "Choice",
    "Entry",
    "Problem",
    "arrange",
    "default_skip",
    "may_apply",
    "natural_key",
    "read_safetensors_index",
    "split_part",
]

DEFAULT_SKIP_DIRS = {
    ".git": "version-control data, not weights",
    ".cache": "download cache (huggingface-cli keeps locks and partial files here)",
    ".huggingface": "download state of huggingface_hub, not weights",
    "original": "the consolidated checkpoint of the original release; servers load the "
    "converted weights beside it",
}
"""Folders not entered unless an ``--include`` glob names them (``original/*``)."""

DEFAULT_SKIP_SUFFIXES = {
    ".lock": "lock file of a download",
    ".incomplete": "partial download (huggingface_hub)",
    ".part": "partial download",
}
"""Files skipped unless an ``--include`` glob names the suffix (``*.part``)."""
SKIP_SUFFIXES = tuple(DEFAULT_SKIP_SUFFIXES)

DUPLICATE_FORMAT_SUFFIXES = (".bin", ".pt", ".pth")
"""PyTorch pickles: skipped beside safetensors of the same folder unless ``--all-formats``."""

_INDEX_SUFFIX = ".safetensors.index.json"
_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})(?P<ext>\.[A-Za-z0-9]+)$")
_SPLIT_EXTENSIONS = frozenset({".safetensors", ".gguf", ".bin", ".pt", ".pth"})
_MAX_INDEX_BYTES = 64 * 1024 * 1024
# The quantisation llama.cpp's tooling and Ollama default to; where a folder holds it
# among others, it is the likeliest one a server is configured for.
_PREFERRED_QUANT = "q4_k_m"


@dataclass(frozen=True, slots=True)
class Entry:
    """One walked file, as :func:`arrange` sees it.

    :ivar relpath: path relative to the walked root, ``/``-separated.
    :ivar size: bytes.
    :ivar metadata: a small config/tokenizer/index file.
    """

    relpath: str
    size: int
    metadata: bool = False


@dataclass(frozen=True)
class Choice:
    """A folder held several models of which one was chosen.

    :ivar directory: the folder, relative to its root (``""`` for the root).
    :ivar chosen: the chosen model's first file.
    :ivar candidates: every model's first file, the chosen one included.
    :ivar reason: why this one.
    """

    directory: str
    chosen: str
    candidates: tuple[str, ...]
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "directory": self.directory,
            "chosen": self.chosen,
            "candidates": list(self.candidates),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Problem:
    """The model is incomplete or unreadable as laid out (a broken download).

    :ivar fatal: the model cannot load as it is (files it names are missing), so warming
        it would only waste memory; a problem that is not fatal (an index that is not
        JSON) only costs the plan its format-aware order, and is a warning.
    """

    path: str
    message: str
    fatal: bool = True

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "message": self.message, "fatal": self.fatal}


@dataclass(frozen=True)
class Arrangement:
    """What :func:`arrange` decided.

    :ivar order: indices into the entries: the files to warm, in warm order.
    :ivar skipped: ``(index, reason)`` of entries not to warm.
    """

    order: tuple[int, ...]
    skipped: tuple[tuple[int, str], ...] = ()
    choices: tuple[Choice, ...] = ()
    problems: tuple[Problem, ...] = ()


def _covers(pattern: str, token: str) -> bool:
    return token in pattern


def default_skip(name: str, is_dir: bool, include: Sequence[str]) -> str | None:
    """Why a walked folder or file is skipped by default, or ``None`` to keep it.

    An ``--include`` glob that names the folder (``original/*``, ``.git/**``) or the
    suffix (``*.part``) lifts the rule; ordinary globs such as ``*.safetensors`` do not.

    :param name: the file or folder name (not a path).
    """
    if is_dir:
        reason = DEFAULT_SKIP_DIRS.get(name)
        if reason is None or any(_covers(p, f"{name}/") for p in include):
            return None
        return f"{name}/: {reason}; --include '{name}/*' warms it"
    lowered = name.lower()
    if not lowered.endswith(SKIP_SUFFIXES):
        return None
    for suffix, reason in DEFAULT_SKIP_SUFFIXES.items():
        if lowered.endswith(suffix):
            if any(_covers(p, suffix) for p in include):
                return None
            return f"{reason}; --include '*{suffix}' warms it"
    return None


def may_apply(name: str) -> bool:
    """Whether a rule of :func:`arrange` can concern a file of this name; a folder with
    no such file is kept as it is, in its order (the walk then skips :func:`arrange`)."""
    return (
        name.endswith(_INDEX_SUFFIX)
        or name.lower().endswith((".safetensors", ".gguf"))
        or "-of-" in name
    )


def split_part(name: str) -> tuple[str, int, int, str] | None:
    """``model-00002-of-00005.gguf`` -> ``("model", 2, 5, ".gguf")``; ``None`` otherwise."""
    match = _SPLIT.match(name)
    if match is None or match.group("ext").lower() not in _SPLIT_EXTENSIONS:
        return None
    part, count = int(match.group("part")), int(match.group("count"))
    if not 1 <= part <= count:
        return None
    return match.group("base"), part, count, match.group("ext")


def read_safetensors_index(path: str) -> list[str]:
    """The shard names of a ``*.safetensors.index.json``, in order of first appearance
    in its ``weight_map`` (the plan warms them in file-name order, as loaders read them).

    :raises ValueError: when the file is not such an index (or is larger than 64 MiB).
    :raises OSError: when it cannot be read.
    """
    fd = os.open(path, OPEN_FLAGS)
    try:
        # Planning must not change what `status` sees: an index that was cold before it
        # was read here is dropped again (one that was cached, or unknown, is left alone).
        try:
            cold_before = pagecache.cachestat(fd).cached == 0
        except OSError:
            cold_before = False
        parts: list[bytes] = []
        size = 0
        while size <= _MAX_INDEX_BYTES:
            part = os.read(fd, _MAX_INDEX_BYTES + 1 - size)
            if not part:
                break
            parts.append(part)
            size += len(part)
        raw = b"".join(parts)
        if cold_before:
            pagecache.evict(fd)
    finally:
        os.close(fd)
    if len(raw) > _MAX_INDEX_BYTES:
        raise ValueError("larger than 64 MiB, not an index")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid JSON ({err})") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError("no weight_map of tensor -> shard names")
    return list(dict.fromkeys(weight_map.values()))


def _name(relpath: str) -> str:
    return relpath.rsplit("/", 1)[-1]


def _directory(relpath: str) -> str:
    return relpath.rsplit("/", 1)[0] if "/" in relpath else ""


def _join(directory: str, name: str) -> str:
    return posixpath.normpath(f"{directory}/{name}") if directory else posixpath.normpath(name)


def natural_key(text: str) -> str:
    """Sort key: "shard-2" before "shard-10"; zero-padded HF names sort the same either way.

    One string per name, not a tuple of parts: a plan of a million files sorts a million
    keys at once, and a tuple of tuples costs ten times the memory. The string compares as
    the parts would: ``re.split`` alternates text and digit runs, so each text run ends in
    NUL (never in a path; a shorter run sorts first) and each number is its length then
    its digits (no leading zeros; a longer number is larger).
    """
    parts = _DIGITS.split(text)
    for position in range(1, len(parts), 2):
        digits = str(int(parts[position]))
        # The NUL ends the text run before the number; the last run's is added below.
        parts[position] = "\0" + chr(1 + len(digits)) + digits
    return "".join(parts) + "\0"


_DIGITS = re.compile(r"(\d+)")


class _Folder:
    """The rules applied to the files of one folder."""

    def __init__(
        self,
        directory: str,
        members: list[int],
        entries: Sequence[Entry],
        load_index: Callable[[str], list[str]],
        exists: Callable[[str], bool],
    ) -> None:
        self.directory = directory
        self.members = members
        self.entries = entries
        self.load_index = load_index
        self.exists = exists
        self.by_name = {_name(entries[i].relpath): i for i in members}
        self.skipped: dict[int, str] = {}
        self.problems: list[Problem] = []
        self.choices: list[Choice] = []
        self.shard_order: list[int] = []

    def name(self, index: int) -> str:
        return _name(self.entries[index].relpath)

    def kept(self, suffixes: tuple[str, ...]) -> list[int]:
        return [
            i
            for i in self.members
            if i not in self.skipped and self.name(i).lower().endswith(suffixes)
        ]

    def safetensors_index(self, all_formats: bool) -> None:
        indexes = sorted(
            (i for i in self.members if self.name(i).endswith(_INDEX_SUFFIX)),
            key=lambda i: (self.name(i) != "model" + _INDEX_SUFFIX, natural_key(self.name(i))),
        )
        named: list[str] = []
        for index in indexes:
            relpath = self.entries[index].relpath
            try:
                shards = [posixpath.normpath(s) for s in self.load_index(relpath)]
            except (OSError, ValueError) as err:
                self.problems.append(
                    Problem(
                        relpath,
                        f"cannot read the safetensors index ({err}); shards are warmed in "
                        "name order",
                        fatal=False,
                    )
                )
                continue
            missing = [s for s in shards if not self.exists(_join(self.directory, s))]
            if missing:
                shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
                self.problems.append(
                    Problem(
                        relpath,
                        f"names {len(missing)} of {len(shards)} shards that are missing "
                        f"({shown}): the download is incomplete",
                    )
                )
            named.extend(s for s in shards if s not in named)
        if not named:
            return
        first_index = self.name(indexes[0])
        if not all_formats:
            for i in self.kept((".safetensors",)):
                if self.name(i) not in named:
                    self.skipped[i] = (
                        f"not named by {first_index}: a second copy of the weights "
                        "(such as consolidated.safetensors) that loaders skip; "
                        "--all-formats warms it"
                    )
        # The index says which shards the server loads; it loads them in natural file-name
        # order (vLLM's safetensors_weights_iterator sorts by _natural_sort_key; SGLang's
        # loader and both engines' prefetch split the same sorted list), not in the order
        # weight_map's tensor names happen to sort (layers.0, layers.1, layers.10, ...).
        self.shard_order = [
            self.by_name[s]
            for s in sorted(named, key=natural_key)
            if s in self.by_name and self.by_name[s] not in self.skipped
        ]

    def duplicate_formats(self) -> None:
        if not self.kept((".safetensors",)):
            return
        for i in self.kept(DUPLICATE_FORMAT_SUFFIXES):
            self.skipped[i] = (
                "same weights as the .safetensors files beside it (which sglang and vLLM "
                "load); --all-formats warms it"
            )

    def split_sets(self, indexed: bool) -> None:
        sets: dict[tuple[str, int, str], list[int]] = {}
        for i in self.members:
            if i in self.skipped:
                continue
            split = split_part(self.name(i))
            if split is None or (indexed and split[3].lower() == ".safetensors"):
                continue
            base, _, count, ext = split
            sets.setdefault((base, count, ext), []).append(i)
        for (base, count, ext), members in sets.items():
            expected = [f"{base}-{n:05d}-of-{count:05d}{ext}" for n in range(1, count + 1)]
            missing = [n for n in expected if not self.exists(_join(self.directory, n))]
            if missing:
                shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
                self.problems.append(
                    Problem(
                        self.entries[members[0]].relpath,
                        f"split model {base}{ext} lacks {len(missing)} of its {count} parts "
                        f"({shown}): the download is incomplete",
                    )
                )

    def gguf_models(self) -> None:
        models: dict[str, list[int]] = {}
        for i in self.kept((".gguf",)):
            name = self.name(i)
            if name.lower().startswith("mmproj"):
                continue  # a vision projector loaded beside the model (--mmproj), not a quant
            split = split_part(name)
            key = split[0] + split[3] if split else name
            models.setdefault(key, []).append(i)
        if len(models) < 2:
            return
        firsts = {
            key: min(members, key=lambda i: natural_key(self.name(i)))
            for key, members in models.items()
        }
        ordered = sorted(models, key=lambda key: natural_key(self.name(firsts[key])))
        preferred = [key for key in ordered if _PREFERRED_QUANT in key.lower()]
        if preferred:
            chosen = preferred[0]
            reason = "Q4_K_M, the usual default quantisation; --include selects another"
        else:
            chosen = ordered[0]
            reason = "first in name order; --include selects another"
        chosen_name = self.name(firsts[chosen])
        for key in ordered:
            if key == chosen:
                continue
            for i in models[key]:
                self.skipped[i] = (
                    f"another GGUF model in this folder; warming {chosen_name} ({reason})"
                )
        self.choices.append(
            Choice(
                directory=self.directory,
                chosen=self.entries[firsts[chosen]].relpath,
                candidates=tuple(self.entries[firsts[key]].relpath for key in ordered),
                reason=reason,
            )
        )


def arrange(
    entries: Sequence[Entry],
    load_index: Callable[[str], list[str]],
    exists: Callable[[str], bool],
    *,
    all_formats: bool = False,
    choose_gguf: bool = True,
) -> Arrangement:
    """Decide which walked files to warm, and in which order.

    Rules, per folder:

    - a ``*.safetensors.index.json`` picks the shards, warmed in natural file-name order
      (the order vLLM's and SGLang's loaders open them); shards it names but the folder
      lacks are a :class:`Problem`; safetensors
      files it does not name (``consolidated.safetensors``) are skipped;
    - ``.bin``/``.pt``/``.pth`` beside ``.safetensors`` are skipped (the same weights);
    - split sets (``name-00001-of-00003.gguf``) missing a part are a :class:`Problem`;
    - several GGUF models (a split set is one) where ``choose_gguf``: one is warmed, a
      ``Q4_K_M`` where there is one, else the first by name, and the :class:`Choice` says so.

    :param entries: the walked files in natural order, metadata first.
    :param load_index: shard names of the index at a relpath (may raise ``OSError`` or
        ``ValueError``).
    :param exists: whether a relpath exists under the root (with or without filters).
    :param all_formats: keep duplicates of other formats and every GGUF model.
    :param choose_gguf: pick one of several GGUF models (off when ``--include`` chose).
    """
    folders: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        folders.setdefault(_directory(entry.relpath), []).append(i)
    skipped: dict[int, str] = {}
    problems: list[Problem] = []
    choices: list[Choice] = []
    reorder: list[list[int]] = []
    for directory, members in folders.items():
        folder = _Folder(directory, members, entries, load_index, exists)
        folder.safetensors_index(all_formats)
        if not all_formats:
            folder.duplicate_formats()
        folder.split_sets(indexed=bool(folder.shard_order))
        if choose_gguf and not all_formats:
            folder.gguf_models()
        skipped.update(folder.skipped)
        problems.extend(folder.problems)
        choices.extend(folder.choices)
        if folder.shard_order:
            reorder.append(folder.shard_order)
    order = [i for i in range(len(entries)) if i not in skipped]
    # Indexed shards take the slots they already hold, in the loaders' order: everything else
    # (metadata first, other folders) keeps its place.
    position = {index: slot for slot, index in enumerate(order)}
    for shard_order in reorder:
        slots = sorted(position[i] for i in shard_order)
        for slot, index in zip(slots, shard_order, strict=True):
            order[slot] = index
    return Arrangement(
        order=tuple(order),
        skipped=tuple(sorted(skipped.items())),
        choices=tuple(choices),
        problems=tuple(problems),
    )

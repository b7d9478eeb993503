"""The public API: what ``import preloader`` offers, and that it works."""

from __future__ import annotations

import types
from pathlib import Path

import anyio

import preloader


def test_all_matches_the_real_exports() -> None:
    for name in preloader.__all__:  # the package loads its names on first use
        getattr(preloader, name)
    public = {
        name
        for name, value in vars(preloader).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(preloader.__all__) - {"__version__"} == public
    assert callable(preloader.plan)  # the function, not shadowed by a module


def test_warm_residency_evict_through_the_public_api(model_dir: Path) -> None:
    async def main() -> None:
        report = await preloader.warm([str(model_dir)], concurrency=2)
        assert report.resident_ratio == 1.0
        assert (await preloader.residency([str(model_dir)])).resident_ratio == 1.0
        assert (await preloader.evict([str(model_dir)])).resident_bytes == 0

    anyio.run(main)

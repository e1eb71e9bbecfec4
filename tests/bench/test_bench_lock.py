"""One benchmark per checkout: a second refuses to start instead of wiping the first
one's stack (both use .data/bench/stack) and measuring it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import bench.run
from bench.__main__ import hold_bench_lock, main


def test_the_lock_is_held_until_its_holder_lets_it_go(tmp_path: Path) -> None:
    held = hold_bench_lock(tmp_path)
    assert held is not None
    assert hold_bench_lock(tmp_path) is None
    os.close(held)
    again = hold_bench_lock(tmp_path)
    assert again is not None
    os.close(again)


def test_a_second_benchmark_says_why_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.run, "BENCH_DIR", tmp_path)
    started: list[object] = []

    async def run(args: object) -> dict[str, object]:
        started.append(args)
        return {}

    monkeypatch.setattr(bench.run, "run", run)
    held = hold_bench_lock(tmp_path)
    assert held is not None
    try:
        assert main(["--quick"]) == 2
    finally:
        os.close(held)
    assert started == []
    assert "Another benchmark is running" in capsys.readouterr().err
    assert not (tmp_path / "stack").exists()

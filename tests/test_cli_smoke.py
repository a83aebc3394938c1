"""The commands a newcomer runs first: they work end to end on small inputs."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from loopservice.cli import main
from loopservice.infra.sqlite_log import open_datastore, signal_log


def test_demo_streams_a_simulation_into_the_running_system(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "demo",
            "--accounts",
            "150",
            "--days",
            "2",
            "--speedup",
            "40000",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "demo"),
            "--exit-after",
        ],
    )
    assert result.exit_code == 0, result.output
    signals = signal_log(open_datastore(tmp_path / "demo" / "loop.db")).read(1, 100_000)
    assert any(s.value.type == "sla.breached" for s in signals)
    assert any(s.value.type == "sla.warning" for s in signals)


def test_bench_log_prints_rates_beside_the_raw_sqlite_limit() -> None:
    result = CliRunner().invoke(main, ["bench", "log", "--events", "3000"])
    assert result.exit_code == 0, result.output
    assert "read + decode" in result.output and "share of limit" in result.output


def test_bench_sla_prints_memory_rate_and_delivery_delay() -> None:
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "sla",
            "--clocks",
            "2000",
            "--events",
            "2000",
            "--deliveries",
            "20",
            "--window",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "memory per open clock" in result.output
    assert "deadline → delivered" in result.output


def test_every_command_explains_itself() -> None:
    runner = CliRunner()
    for command in [[], ["run"], ["demo"], ["ingest"], ["simulate"], ["dead-letters"],
                    ["bench", "log"], ["bench", "sla"], ["policy", "check"], ["explain", "case"],
                    ["alerts", "list"]]:  # fmt: skip
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.output

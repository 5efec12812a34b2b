"""`bench privacy epsilon|sigma` through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bench.cli.privacy import app

runner = CliRunner()
ROW0 = ["--sampling-rate", "0.04", "--noise-multiplier", "1.5", "--steps", "2250", "--delta", "1e-5"]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_epsilon_json():
    result = runner.invoke(app, ["epsilon", *ROW0, "--json"])
    assert result.exit_code == 0, result.output
    assert last_json(result.stdout)["epsilon"] == pytest.approx(7.3293347, rel=1e-6)


def test_epsilon_human():
    result = runner.invoke(app, ["epsilon", *ROW0, "--accountant", "pld"])
    assert result.exit_code == 0, result.output
    assert "6.768" in result.stdout and "pld" in result.stdout


def test_sigma_json_and_human():
    args = ["sigma", "--epsilon", "8", "--sampling-rate", "0.04", "--steps", "2250", "--delta", "1e-5"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    sigma = last_json(result.stdout)["noise_multiplier"]
    assert sigma == pytest.approx(1.416, abs=1e-3)
    check = runner.invoke(
        app,
        ["epsilon", "--sampling-rate", "0.04", "--noise-multiplier", repr(sigma)]
        + ["--steps", "2250", "--delta", "1e-5", "--json"],
    )
    assert last_json(check.stdout)["epsilon"] <= 8.0
    human = runner.invoke(app, args)
    assert human.exit_code == 0 and "σ =" in human.stdout


@pytest.mark.parametrize(
    ("command", "override"),
    [
        ("epsilon", {"--sampling-rate": "0"}),
        ("epsilon", {"--sampling-rate": "1.5"}),
        ("epsilon", {"--noise-multiplier": "0"}),
        ("epsilon", {"--noise-multiplier": "-1"}),
        ("epsilon", {"--steps": "0"}),
        ("epsilon", {"--delta": "1"}),
        ("epsilon", {"--delta": "0"}),
        ("epsilon", {"--accountant": "gdp"}),
        ("epsilon", {"--accountant": "moments"}),
        ("sigma", {"--epsilon": "0"}),
        ("sigma", {"--epsilon": "-2"}),
        ("sigma", {"--sampling-rate": "2"}),
        ("sigma", {"--steps": "-5"}),
        ("sigma", {"--delta": "1.5"}),
        ("sigma", {"--accountant": "gdp"}),
    ],
)
def test_bad_input_is_one_line_exit_2(command, override):
    options = {"--sampling-rate": "0.01", "--steps": "100", "--delta": "1e-5"}
    options |= {"--noise-multiplier": "1.0"} if command == "epsilon" else {"--epsilon": "1.0"}
    options |= override
    result = runner.invoke(app, [command, *[x for kv in options.items() for x in kv], "--json"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert result.stdout == ""

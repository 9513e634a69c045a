"""Configuration: precedence of flags, environment and TOML, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from foliod.config import Config, ConfigError, build_parser, load_config, parse_size
from foliod.mm import ThpSetting


def test_defaults_are_the_documented_ones() -> None:
    """With nothing set the server listens on loopback with 4 GiB of RAM and state under var/."""
    config = load_config([], environ={})
    assert config == Config()
    assert (config.listen, config.metrics_listen) == ("127.0.0.1:50051", "127.0.0.1:9464")
    assert config.ram == 4 << 30
    assert config.state_dir == Path("var")


def test_flags_beat_environment_beat_toml(tmp_path: Path) -> None:
    """A flag wins over FOLIOD_* which wins over the TOML file, option by option."""
    toml = tmp_path / "foliod.toml"
    toml.write_text('ram = "1GiB"\nworkers = 3\nlog_level = "debug"\n[mthp]\n64kB = "always"\n')
    env = {"FOLIOD_CONFIG": str(toml), "FOLIOD_RAM": "2GiB", "FOLIOD_WORKERS": "5"}
    config = load_config(["--ram", "8GiB"], environ=env)
    assert config.ram == 8 << 30
    assert config.workers == 5
    assert config.log_level == "debug"
    assert config.mthp == {64: ThpSetting.ALWAYS}


def test_sizes_parse_binary_and_decimal_units() -> None:
    """Sizes accept IEC and SI suffixes and plain bytes."""
    assert parse_size("4GiB") == parse_size("4G") == 4 << 30
    assert parse_size("1TiB") == 1 << 40
    assert parse_size("1GB") == 10**9
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--ram", "1000"], {}, "ram"),
        (["--ram", "32TiB"], {}, "ram"),
        (["--workers", "0"], {}, "--workers"),
        (["--max-streams", "0"], {}, "--max-streams"),
        ([], {"FOLIOD_THP_ENABLED": "sometimes"}, "FOLIOD_THP_ENABLED"),
        (["--mthp", "8kB=always"], {}, "--mthp"),
        (["--listen", "nowhere"], {}, "--listen"),
        (["--folio-bytes", "81"], {}, "folio_bytes"),
        (["--debug-checks", "maybe"], {}, "--debug-checks"),
        (["--metrics-listen", "9464"], {}, "metrics_listen"),
        (["--max-file-order", "10"], {}, "--max-file-order"),
        (["--reporting-order", "11"], {}, "--reporting-order"),
        (["--reporting-capacity", "0"], {}, "--reporting-capacity"),
        ([], {"FOLIOD_REPORTING_DELAY_SECONDS": "-1"}, "FOLIOD_REPORTING_DELAY_SECONDS"),
    ],
)
def test_bad_values_name_the_option(argv: list[str], env: dict[str, str], needle: str) -> None:
    """Every invalid value raises ConfigError naming the option and where it came from."""
    with pytest.raises(ConfigError, match=needle):
        load_config(argv, environ=env)


def test_toml_errors_are_reported(tmp_path: Path) -> None:
    """An unreadable, malformed or unknown-key TOML file is a ConfigError."""
    bad = tmp_path / "bad.toml"
    bad.write_text("ram = \n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--config", str(bad)], environ={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("rma = 1\n")
    with pytest.raises(ConfigError, match="rma"):
        load_config(["--config", str(unknown)], environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--config", str(tmp_path / "missing.toml")], environ={})


def test_help_documents_every_option() -> None:
    """`foliod --help` names each option with its environment variable and default."""
    text = build_parser().format_help()
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
        assert "FOLIOD_" + name.upper() in text


def test_example_config_file_loads_and_matches_defaults() -> None:
    """deploy/foliod.toml is a valid configuration that spells out the defaults."""
    example = Path(__file__).resolve().parent.parent / "deploy" / "foliod.toml"
    config = load_config(["--config", str(example)], environ={})
    assert config == Config(mthp={2048: ThpSetting.INHERIT})

"""Server configuration: flags, then FOLIOD_* environment variables, then TOML, then defaults.

Every option is declared once in OPTIONS; the flag (--ram), the variable (FOLIOD_RAM), the TOML
key (ram) and the --help text all derive from that one entry.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from foliod.api import DEFAULT_ADDRESS, __version__
from foliod.api import parse_size as parse_size  # noqa: PLC0414 -- re-exported
from foliod.mm import MAX_PAGE_ORDER, DescriptorSizes, FoliodError, ThpSetting
from foliod.mm.backing_dev import DEVICE_PROFILES, FaultRule, check_fault_rules
from foliod.mm.folio_store import MAX_PAGECACHE_ORDER
from foliod.mm.guest import BackingSpec
from foliod.mm.huge_memory import size_kb_to_order
from foliod.mm.lru import POLICIES
from foliod.mm.machine import validate_ram_bytes
from foliod.mm.page_writeback import DirtyLimits

ENV_PREFIX = "FOLIOD_"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and its source."""


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_thp(text: str) -> ThpSetting:
    try:
        return ThpSetting(str(text).strip().lower())
    except ValueError:
        raise ValueError(f"not a THP setting: {text!r} (always, madvise, never)") from None


def parse_mthp(text: str | Mapping[str, str]) -> dict[int, ThpSetting]:
    """Per-size knobs, "64kB=always,2048kB=inherit" or a TOML table; keys are sizes in kB."""
    items = text.items() if isinstance(text, Mapping) else (
        part.split("=", 1) for part in str(text).split(",") if part.strip()
    )  # fmt: skip
    result = {}
    for key, value in items:
        size = str(key).strip().lower().removesuffix("kb")
        if not size.isdigit():
            raise ValueError(f"not an mTHP size: {key!r} (examples: 16kB, 64kB, 2048kB)")
        try:
            size_kb_to_order(int(size))
        except FoliodError as exc:
            raise ValueError(exc.message) from None
        result[int(size)] = parse_thp(value)
    return result


def parse_level(text: str) -> str:
    level = str(text).strip().lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError(f"not a log level: {text!r} (debug, info, warning, error)")
    return level


def parse_format(text: str) -> str:
    fmt = str(text).strip().lower()
    if fmt not in ("json", "console"):
        raise ValueError(f"not a log format: {text!r} (json, console)")
    return fmt


def parse_address(text: str) -> str:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not a host:port address: {text!r}")
    return str(text)


def parse_path(text: str | Path) -> Path | None:
    """A file path; empty means none."""
    return Path(text) if str(text).strip() else None


def parse_sha256(text: str) -> str | None:
    """A SHA-256 digest as 64 hex digits (lower-cased); empty: none."""
    digest = str(text).strip().lower()
    if not digest:
        return None
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError("expected 64 hex digits (sha256sum of the token)")
    return digest


def parse_positive_int(text: str | int) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be positive, not {value}")
    return value


def parse_seconds(text: str | float) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise ValueError(f"must be 0 to 3600 seconds, not {value}")
    return value


_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def parse_hostname(text: str) -> str:
    """A host name for real:<hostname>: a Kubernetes node name or a DNS name; empty: this
    host's."""
    name = str(text).strip()
    if name and not _HOSTNAME.fullmatch(name):
        raise ValueError(f"not a host name: {text!r} (letters, digits, '.', '_', '-'; at most 253)")
    return name


# Host backings an observed guest may state (the simulated guests' BackingSpec, mthp aside).
OBSERVE_BACKINGS = ("base", "thp", "hugetlb_2m", "hugetlb_1g")


def parse_observe_backing(text: str) -> str:
    """What the observed host's own host backs its RAM with; empty: not stated."""
    name = str(text).strip().lower()
    if name and name not in OBSERVE_BACKINGS:
        raise ValueError(f"not a backing: {text!r} ({', '.join(OBSERVE_BACKINGS)})")
    return name


# What the observer serves when /proc/kpageflags cannot be read; empty: nothing (exit 1).
OBSERVE_FALLBACKS = ("meminfo",)


def parse_observe_fallback(text: str) -> str:
    """The observer's fallback when kpageflags cannot be read: meminfo, or none."""
    name = str(text).strip().lower()
    if name == "none":
        return ""
    if name and name not in OBSERVE_FALLBACKS:
        raise ValueError(f"not a fallback: {text!r} ({', '.join(OBSERVE_FALLBACKS)} or none)")
    return name


def parse_device(text: str) -> str:
    name = str(text).strip().lower()
    if name not in DEVICE_PROFILES:
        raise ValueError(f"not a device profile: {text!r} ({', '.join(DEVICE_PROFILES)})")
    return name


def int_from_to(low: int, high: int) -> Callable[[str | int], int]:
    """A parser of integers from low to high."""

    def parse(text: str | int) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"must be {low}..{high}, not {value}")
        return value

    return parse


parse_order = int_from_to(0, MAX_PAGECACHE_ORDER)
parse_reporting_order = int_from_to(0, MAX_PAGE_ORDER)


def parse_ra_kb(text: str | int) -> int:
    value = int(text)
    if value < 0 or value % 4 or value > 1 << 18:
        raise ValueError(f"must be a multiple of 4 from 0 to 262144, not {value}")
    return value


def parse_policy(text: str) -> str:
    name = str(text).strip().lower()
    if name not in POLICIES:
        raise ValueError(f"not a reclaim policy: {text!r} ({', '.join(POLICIES)})")
    return name


def parse_capacity(text: str | int) -> int:
    value = parse_size(text)
    if value % 4096:
        raise ValueError(f"must be a multiple of 4096 bytes, not {value}")
    return value


def parse_faults(text: str) -> tuple[FaultRule, ...]:
    """Fault rules from "ERRNO:key=value,...;..." (ERRNO: EIO, ENOSPC, or empty for slow-only)."""
    rules = []
    for spec in str(text).split(";"):
        if not spec.strip():
            continue
        errno_name, _, params = spec.strip().partition(":")
        values: dict[str, Any] = {"errno_name": errno_name.strip().upper()}
        for item in params.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(f"fault parameter {item!r} is not key=value")
            if key == "name":
                values["name"] = value.strip()
            elif key in ("offset", "length"):
                values[key] = parse_size(value)
            elif key == "count":
                values["remaining"] = int(value)
            elif key == "probability":
                values["probability"] = float(value)
            elif key == "delay_ms":
                values["delay_seconds"] = int(value) / 1000
            else:
                raise ValueError(f"unknown fault parameter {key!r}")
        try:
            rules.append(FaultRule(**values))
        except FoliodError as exc:
            raise ValueError(exc.message) from None
    try:
        check_fault_rules(len(rules))
    except FoliodError as exc:
        raise ValueError(exc.message) from None
    return tuple(rules)


def parse_percent(text: str | int) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise ValueError(f"must be 1..100, not {value}")
    return value


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str = ""
    # A flag taking no value on the command line (--insecure); a boolean elsewhere.
    switch: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("listen", parse_address, "gRPC listen address", "HOST:PORT"),
    Option("tls_cert", parse_path, "PEM certificate chain: serve gRPC over TLS", "FILE"),
    Option("tls_key", parse_path, "PEM private key of --tls-cert", "FILE"),
    Option(
        "tls_client_ca",
        parse_path,
        "PEM CA bundle: require client certificates it signed (mutual TLS)",
        "FILE",
    ),
    Option(
        "tokens",
        parse_path,
        "bearer token file (TOML or .json): sha256, principal, role, tenant per token",
        "FILE",
    ),
    Option(
        "insecure",
        parse_bool,
        "allow a non-loopback listen address without TLS and authentication",
        switch=True,
    ),
    Option("metrics_listen", str, "Prometheus /metrics address; empty disables it", "HOST:PORT"),
    Option(
        "metrics_tls_cert", parse_path, "PEM certificate chain: serve /metrics over TLS", "FILE"
    ),
    Option("metrics_tls_key", parse_path, "PEM private key of --metrics-tls-cert", "FILE"),
    Option(
        "metrics_client_ca",
        parse_path,
        "PEM CA bundle: /metrics requires client certificates it signed",
        "FILE",
    ),
    Option(
        "metrics_token_sha256",
        parse_sha256,
        "SHA-256 (hex) of the bearer token /metrics requires",
        "HEX",
    ),
    Option("ram", parse_size, "simulated RAM of the host (1 MiB to 16 TiB)", "SIZE"),
    Option("state_dir", Path, "directory for foliod's state", "DIR"),
    Option("log_level", parse_level, "log level: debug, info, warning, error", "LEVEL"),
    Option("log_format", parse_format, "log format: json (JSON lines) or console", "FORMAT"),
    Option("grace_seconds", parse_seconds, "time in-flight RPCs get to finish on shutdown", "S"),
    Option("workers", parse_positive_int, "gRPC threads running calls at once", "N"),
    Option("max_streams", parse_positive_int, "Submit streams open at once", "N"),
    Option("max_message_bytes", parse_size, "largest gRPC message accepted or sent", "SIZE"),
    Option(
        "idempotency_window_seconds",
        parse_seconds,
        "a mutation retried with the same idempotency-key this long after the first ended gets "
        "the first outcome (0: only retries overlapping the first)",
        "S",
    ),
    Option(
        "idempotency_max_entries",
        parse_positive_int,
        "most mutation outcomes kept for idempotency-key retries, the oldest dropped first",
        "N",
    ),
    Option("debug_checks", parse_bool, "run the consistency checker after every change", "BOOL"),
    Option(
        "observe_host",
        parse_bool,
        "serve this real host read-only as machine real:<hostname>, scanned from "
        "/proc/kpageflags (needs uid 0, or CAP_DAC_READ_SEARCH)",
        switch=True,
    ),
    Option(
        "observe_only",
        parse_bool,
        "with --observe-host: serve and export the real host alone, simulating nothing (the "
        "lean exporter for every node)",
        switch=True,
    ),
    Option(
        "observe_backing",
        parse_observe_backing,
        "the observed host is a guest whose RAM its host backs with base pages, thp, "
        "hugetlb_2m or hugetlb_1g: report the host side of the duplicated memory map",
        "BACKING",
    ),
    Option(
        "observe_hvo",
        parse_bool,
        "with a hugetlb --observe-backing: the host optimizes the HugeTLB pages' vmemmap (HVO)",
        "BOOL",
    ),
    Option(
        "observe_fallback",
        parse_observe_fallback,
        "with --observe-host, when /proc/kpageflags cannot be read: meminfo serves an estimate "
        "from /proc/meminfo alone (labelled source=meminfo-estimate) instead of not starting",
        "NAME",
    ),
    Option(
        "observe_hostname",
        parse_hostname,
        "the <hostname> of real:<hostname> (default: this host's name; in a pod, give the node's)",
        "NAME",
    ),
    Option(
        "observe_interval_seconds",
        parse_seconds,
        "seconds between scans of the real host (0: scan once at start)",
        "S",
    ),
    # Issue 13 part 3 (snapshots).
    Option(
        "boot_from",
        parse_path,
        "boot the host from a snapshot file (foliodctl snapshot): its free blocks and folios "
        "at their frames; --ram must hold it",
        "FILE",
    ),
    Option("thp_enabled", parse_thp, "top-level THP knob: always, madvise, never", "SETTING"),
    Option("mthp", parse_mthp, "per-size mTHP knobs, e.g. 64kB=always,2048kB=inherit", "LIST"),
    Option(
        "thp_deposit_pgtable",
        parse_bool,
        "PMD-mapped THPs deposit a PTE table, as on x86-64",
        "BOOL",
    ),
    Option("device", parse_device, "simulated device under the files: nvme or hdd", "PROFILE"),
    Option("max_file_order", parse_order, "largest page cache folio order (0..9)", "N"),
    Option("ra_kb", parse_ra_kb, "default readahead window in KiB (0 turns it off)", "KIB"),
    Option(
        "dirty_background_ratio", parse_percent, "flusher starts above this percent dirty", "PCT"
    ),
    Option(
        "dirty_ratio", parse_percent, "writers write back first above this percent dirty", "PCT"
    ),
    Option("dirty_expire_seconds", parse_seconds, "dirty data older than this is flushed", "S"),
    Option("dirty_writeback_seconds", parse_seconds, "flusher period (0 turns it off)", "S"),
    Option(
        "reclaim_policy",
        parse_policy,
        "file LRU policy: two_list, mglru, lru, fifo or clock",
        "NAME",
    ),
    Option(
        "cache_capacity",
        parse_capacity,
        "most memory the page cache may hold (0: only RAM limits it)",
        "SIZE",
    ),
    Option(
        "faults",
        parse_faults,
        "backing-store fault rules, ';'-separated, e.g. "
        "'EIO:name=a.dat,offset=0,length=4096,count=3,probability=0.5,delay_ms=10'",
        "RULES",
    ),
    Option("fault_seed", int, "seed of the fault rules' probabilities", "N"),
    Option(
        "reporting_delay_seconds",
        parse_seconds,
        "guests report free memory to the host this long after freeing it",
        "S",
    ),
    Option("reporting_order", parse_reporting_order, "smallest free block a guest reports", "N"),
    Option("reporting_capacity", parse_positive_int, "free blocks per report batch", "N"),
    Option("struct_page_bytes", parse_positive_int, "struct page size today", "B"),
    Option("interim_page_bytes", parse_positive_int, "struct page size in the interim plan", "B"),
    Option("memdesc_bytes", parse_positive_int, "per-frame memdesc entry size", "B"),
    Option("folio_bytes", parse_positive_int, "folio descriptor size, order 0", "B"),
    Option("large_folio_bytes", parse_positive_int, "folio descriptor size, large folios", "B"),
    Option("slab_bytes", parse_positive_int, "slab descriptor size (estimate)", "B"),
    Option("ptdesc_bytes", parse_positive_int, "page-table descriptor size (estimate)", "B"),
)


_SIZES = DescriptorSizes()


@dataclass(frozen=True)
class Config:
    """The effective configuration of one server."""

    listen: str = DEFAULT_ADDRESS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tokens: Path | None = None
    insecure: bool = False
    metrics_listen: str = "127.0.0.1:9464"
    metrics_tls_cert: Path | None = None
    metrics_tls_key: Path | None = None
    metrics_client_ca: Path | None = None
    metrics_token_sha256: str | None = None
    ram: int = 4 << 30
    state_dir: Path = Path("var")
    log_level: str = "info"
    log_format: str = "json"
    grace_seconds: float = 5.0
    # Two measured fastest on 2 cores (docs/operations.md, "Worker threads"); streams get
    # threads of their own, beyond these.
    workers: int = 2
    max_streams: int = 7
    max_message_bytes: int = 4 << 20
    idempotency_window_seconds: float = 600.0
    idempotency_max_entries: int = 65_536
    debug_checks: bool = False
    observe_host: bool = False
    observe_interval_seconds: float = 60.0
    observe_only: bool = False
    observe_backing: str = ""
    observe_hvo: bool = False
    observe_fallback: str = ""
    observe_hostname: str = ""
    boot_from: Path | None = None
    thp_enabled: ThpSetting = ThpSetting.ALWAYS
    mthp: dict[int, ThpSetting] = field(default_factory=dict)
    thp_deposit_pgtable: bool = True
    device: str = "nvme"
    max_file_order: int = 9
    ra_kb: int = 128
    dirty_background_ratio: int = 10
    dirty_ratio: int = 20
    dirty_expire_seconds: float = 30.0
    dirty_writeback_seconds: float = 5.0
    reclaim_policy: str = "two_list"
    cache_capacity: int = 0
    faults: tuple[FaultRule, ...] = ()
    fault_seed: int = 0
    reporting_delay_seconds: float = 2.0
    reporting_order: int = 9
    reporting_capacity: int = 32
    struct_page_bytes: int = _SIZES.struct_page_bytes
    interim_page_bytes: int = _SIZES.interim_page_bytes
    memdesc_bytes: int = _SIZES.memdesc_bytes
    folio_bytes: int = _SIZES.folio_bytes
    large_folio_bytes: int = _SIZES.large_folio_bytes
    slab_bytes: int = _SIZES.slab_bytes
    ptdesc_bytes: int = _SIZES.ptdesc_bytes

    def descriptor_sizes(self) -> DescriptorSizes:
        return DescriptorSizes(**{f.name: getattr(self, f.name) for f in fields(DescriptorSizes)})

    def observe_backing_spec(self) -> BackingSpec | None:
        """The stated host backing of the observed guest, if any."""
        if not self.observe_backing:
            return None
        return BackingSpec.of(self.observe_backing, hvo=self.observe_hvo)

    def dirty_limits(self) -> DirtyLimits:
        return DirtyLimits(self.dirty_background_ratio, self.dirty_ratio, self.dirty_expire_seconds)

    def as_log_fields(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["state_dir"] = str(self.state_dir)
        for name in _PATH_OPTIONS:
            values[name] = None if values[name] is None else str(values[name])
        values["thp_enabled"] = str(self.thp_enabled)
        values["mthp"] = {f"{k}kB": str(v) for k, v in self.mthp.items()}
        values["faults"] = [repr(rule) for rule in self.faults]
        return values


_PATH_OPTIONS = (
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "tokens",
    "metrics_tls_cert",
    "metrics_tls_key",
    "metrics_client_ca",
    "boot_from",
)


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="foliod",
        description="foliod: a gRPC service simulating Linux physical memory, folios and the "
        "memory map. Precedence: flags, then FOLIOD_* environment variables, then the TOML "
        "file, then defaults.",
    )
    parser.add_argument("--version", action="version", version=f"foliod {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML file with any option below as a top-level key (env: FOLIOD_CONFIG)",
    )
    for option in OPTIONS:
        default = getattr(defaults, option.name)
        if isinstance(default, dict):
            default = ",".join(f"{k}kB={v}" for k, v in default.items()) or "none"
        elif default is None:
            default = "none"
        env_help = f"env: {ENV_PREFIX}{option.name.upper()}"
        if option.switch:
            parser.add_argument(
                "--" + option.name.replace("_", "-"),
                dest=option.name,
                action="store_const",
                const="true",
                default=argparse.SUPPRESS,
                help=f"{option.help} ({env_help}=true)",
            )
            continue
        parser.add_argument(
            "--" + option.name.replace("_", "-"),
            dest=option.name,
            metavar=option.metavar or None,
            default=argparse.SUPPRESS,
            help=f"{option.help} ({env_help}; default: {default})",
        )
    return parser


def load_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """Builds the effective configuration; raises ConfigError naming the bad option."""
    environ = os.environ if environ is None else environ
    flags = vars(build_parser().parse_args(list(argv)))
    config_path = flags.pop("config", None) or environ.get(ENV_PREFIX + "CONFIG")
    table: dict[str, Any] = {}
    if config_path:
        try:
            with open(config_path, "rb") as handle:
                table = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_path}: {exc}") from exc
        known = {option.name for option in OPTIONS}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) in {config_path}: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for option in OPTIONS:
        env_name = ENV_PREFIX + option.name.upper()
        for source, raw in (
            (f"--{option.name.replace('_', '-')}", flags.get(option.name)),
            (env_name, environ.get(env_name)),
            (f"{config_path}:{option.name}", table.get(option.name)),
        ):
            if raw is None:
                continue
            try:
                values[option.name] = option.parse(raw)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{source}: {exc}") from exc
            break
    if values.get("metrics_listen"):
        try:
            parse_address(values["metrics_listen"])
        except ValueError as exc:
            raise ConfigError(f"metrics_listen: {exc}") from exc
    config = Config(**values)
    try:
        validate_ram_bytes(config.ram, "ram")
        config.descriptor_sizes()
        config.dirty_limits()
    except FoliodError as exc:
        raise ConfigError(f"{exc.field}: {exc.message}") from exc
    if config.observe_only and not config.observe_host:
        raise ConfigError("observe_only: it needs observe_host (there is nothing else to serve)")
    if config.observe_backing and not config.observe_host:
        raise ConfigError("observe_backing: it needs observe_host (it describes the observed host)")
    if config.observe_fallback and not config.observe_host:
        raise ConfigError(
            "observe_fallback: it needs observe_host (it is what the observer falls back on)"
        )
    if config.observe_hvo and not config.observe_backing.startswith("hugetlb"):
        raise ConfigError(
            "observe_hvo: HVO needs observe_backing hugetlb_2m or hugetlb_1g, not "
            f"{config.observe_backing or 'none'}"
        )
    check_security(config)
    return config


def is_loopback(address: str) -> bool:
    """Whether a host:port address listens on loopback only (localhost, 127/8, ::1)."""
    host = address.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_security(config: Config) -> None:
    """Raises ConfigError for TLS options that do not go together, or a non-loopback listen
    address without TLS and authentication (unless insecure)."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("tls_cert and tls_key: give both or neither")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ConfigError("tls_client_ca: mutual TLS needs tls_cert and tls_key too")
    authenticated = config.tokens is not None or config.tls_client_ca is not None
    secured = config.tls_cert is not None and authenticated
    if not (secured or config.insecure or is_loopback(config.listen)):
        raise ConfigError(
            f"refusing to listen on {config.listen} without TLS and authentication "
            "(--tls-cert/--tls-key with --tokens or --tls-client-ca); "
            "pass --insecure to do it anyway"
        )
    if (config.metrics_tls_cert is None) != (config.metrics_tls_key is None):
        raise ConfigError("metrics_tls_cert and metrics_tls_key: give both or neither")
    if config.metrics_client_ca is not None and config.metrics_tls_cert is None:
        raise ConfigError("metrics_client_ca: client certificates need metrics_tls_cert too")
    metrics_secured = config.metrics_tls_cert is not None and (
        config.metrics_token_sha256 is not None or config.metrics_client_ca is not None
    )
    if config.metrics_listen and not (
        metrics_secured or config.insecure or is_loopback(config.metrics_listen)
    ):
        raise ConfigError(
            f"refusing to serve /metrics on {config.metrics_listen} without TLS and "
            "authentication (--metrics-tls-cert/--metrics-tls-key with --metrics-token-sha256 "
            "or --metrics-client-ca); pass --insecure to do it anyway"
        )

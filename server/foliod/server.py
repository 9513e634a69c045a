"""Assembles and runs a foliod server: machines, gRPC services, health, reflection, metrics."""

from __future__ import annotations

import dataclasses
import ssl
import threading
import time
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from foliod.config import Config
from foliod.mm import HOST, FoliodError, Machine, Machines, ThpPolicy
from foliod.mm.backing_dev import DEVICE_PROFILES, BackingStore
from foliod.mm.guest import Guests, ReportingConfig
from foliod.mm.huge_memory import size_kb_to_order
from foliod.mm.snapshot import boot
from foliod.mm.snapshot import read_file as read_snapshot
from foliod.rpc.auth import AuthInterceptor, TokenFile
from foliod.rpc.exporter import MetricsEndpoint, TlsFiles
from foliod.rpc.idempotency import IdempotencyInterceptor, OutcomeCache
from foliod.rpc.interceptors import AccessLog, CallReporter, ObservingInterceptor
from foliod.rpc.metrics import GrpcServerMetrics, MachineCollector
from foliod.rpc.observe import (
    HostObserver,
    ObservedGuests,
    ObservedHostCollector,
    ObservedMachines,
    ObservingServicer,
)
from foliod.rpc.pool import WorkerPool
from foliod.rpc.reflection import enable_server_reflection
from foliod.rpc.servicer import FoliodServicer
from foliod.rpc.tls import CertificateFiles
from foliod.state_lock import StateDirLock
from foliod.v1 import foliod_pb2, foliod_pb2_grpc

SERVICE_NAME = foliod_pb2.DESCRIPTOR.services_by_name["Foliod"].full_name


# How often the page reporting worker looks for guests whose reporting delay has passed.
REPORTING_TICK_SECONDS = 0.25
# How long grpc's stop may take beyond the grace period (when it cancels what still runs)
# before foliod writes the store back and exits without it: grpc's stop can hang for ever
# (grpcio 1.85 did with Submit streams whose messages it could not parse).
STOP_MARGIN_SECONDS = 1.0
# Threads for streams beyond Submit's: health Watch and reflection streams, each holding one
# while open. Past all of them, calls wait for a stream to end (or for their deadline).
OTHER_STREAM_THREADS = 32


def worker_pool(config: Config) -> WorkerPool:
    """The threads grpc runs calls on: `workers` run calls; each open stream holds a thread of
    its own beyond them."""
    return WorkerPool(config.workers, config.workers + config.max_streams + OTHER_STREAM_THREADS)


def build_host(config: Config) -> Machine:
    host = build_machine(config, HOST, config.ram)
    if config.boot_from is not None:
        boot_host(host, config.boot_from)
    return host


def boot_host(host: Machine, path: Path) -> None:
    """--boot-from: the host starts from a snapshot file; ValueError (foliod does not start)
    naming the file when it cannot be read, is not a valid snapshot or does not fit."""
    try:
        boot(read_snapshot(path), host)
    except OSError as exc:
        raise ValueError(f"--boot-from {path}: {exc.strerror or exc}") from exc
    except FoliodError as exc:
        raise ValueError(f"--boot-from {path}: {exc.message}") from exc


def build_machine(config: Config, name: str, ram_bytes: int) -> Machine:
    """The host, or a guest: the same settings, its own store under state_dir/files/<name>."""
    store = BackingStore(config.state_dir / "files" / name, DEVICE_PROFILES[config.device])
    store.faults.set([dataclasses.replace(rule) for rule in config.faults], config.fault_seed)
    return Machine(
        name,
        ram_bytes,
        sizes=config.descriptor_sizes(),
        thp=ThpPolicy(
            config.thp_enabled, {size_kb_to_order(kb): s for kb, s in config.mthp.items()}
        ),
        deposit_pgtable=config.thp_deposit_pgtable,
        store=store,
        max_file_order=config.max_file_order,
        ra_pages=config.ra_kb // 4,
        dirty_limits=config.dirty_limits(),
        reclaim_policy=config.reclaim_policy,
        cache_capacity_pages=config.cache_capacity // 4096 or None,
    )


class FoliodServer:
    """One running foliod: start() binds the ports, stop() drains and shuts down."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = structlog.get_logger("foliod")
        # Before anything reads or writes the state directory; released by stop().
        self.state_lock = StateDirLock(config.state_dir)
        try:
            self._build(config)
        except BaseException:
            self.state_lock.release()
            raise

    def _build(self, config: Config) -> None:
        self.machines = Machines(build_host(config))
        self.guests = Guests(
            self.machines,
            lambda name, ram_bytes: build_machine(config, name, ram_bytes),
            ReportingConfig(
                config.reporting_delay_seconds, config.reporting_order, config.reporting_capacity
            ),
            time.monotonic,
        )
        # Counters' *_created series only double the scrape for no use in dashboards.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        # --observe-host: the servicer and the collector also see the real host, read-only.
        self.observer: HostObserver | None = None
        served: Machines = self.machines
        served_guests: Guests = self.guests
        if config.observe_host:
            self.observer = HostObserver.from_config(config)
            served = ObservedMachines(self.machines, self.observer)
            served_guests = ObservedGuests(self.guests, self.observer)
            self.registry.register(ObservedHostCollector(self.observer))
        self.registry.register(MachineCollector(served, served_guests))
        self.calls = CallReporter()
        self.calls.observers = (AccessLog(), GrpcServerMetrics(self.registry, self.calls))
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.pool = worker_pool(config)
        # Outcomes of mutations sent with an idempotency-key; tests may replace its clock.
        self.outcomes = OutcomeCache(
            config.idempotency_window_seconds, config.idempotency_max_entries, time.monotonic
        )
        # Authentication: a token file (reloaded on SIGHUP), or client certificates alone.
        self.tokens = None if config.tokens is None else TokenFile(config.tokens)
        if self.tokens is not None:
            self.machines.set_tenant_limits(self.tokens.table.limits)
        self.auth: AuthInterceptor | None = None
        if self.tokens is not None or config.tls_client_ca is not None:
            token_file = self.tokens
            self.auth = AuthInterceptor(lambda: None if token_file is None else token_file.table)
        self.certificates = (
            None
            if config.tls_cert is None or config.tls_key is None
            else CertificateFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
        )
        # Outermost first: refusals and replays are observed (logged and counted); the
        # authenticated principal keys IdempotencyInterceptor's outcomes.
        interceptors: list[grpc.ServerInterceptor] = [
            ObservingInterceptor(self.calls, blocking=self.pool.blocking)
        ]
        if self.auth is not None:
            interceptors.append(self.auth)
            interceptors.append(
                IdempotencyInterceptor(self.outcomes, principal=self.auth.principal)
            )
        else:
            interceptors.append(IdempotencyInterceptor(self.outcomes))
        self.grpc = grpc.server(
            self.pool,  # type: ignore[arg-type]  # typed as ThreadPoolExecutor; grpc only submits
            interceptors=interceptors,
            options=options,
        )
        self.servicer = (FoliodServicer if self.observer is None else ObservingServicer)(
            served,
            served_guests,
            debug_checks=config.debug_checks,
            max_streams=config.max_streams,
            outcomes=self.outcomes,
        )
        foliod_pb2_grpc.add_FoliodServicer_to_server(self.servicer, self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME), self.grpc)
        self.grpc_port = 0
        self.metrics_port = 0
        self._metrics: MetricsEndpoint | None = None
        self._stopped = threading.Event()
        self._stop_flusher = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="flusher", daemon=True)
        self._reporter = threading.Thread(
            target=self._reporting_loop, name="page_reporting", daemon=True
        )

    def _flush_loop(self) -> None:
        """The flusher threads (wb_workfn): every dirty_writeback interval, each machine's
        expired dirty data and anything over the background threshold is written back."""
        while not self._stop_flusher.wait(self.config.dirty_writeback_seconds):
            for machine in self.machines:
                with machine.lock:
                    if machine.page_cache is not None:
                        machine.page_cache.flush()

    def _reporting_loop(self) -> None:
        """The page reporting worker: runs each guest's free page reporting once its delay
        after the guest freed memory has passed."""
        while not self._stop_flusher.wait(REPORTING_TICK_SECONDS):
            for guest, run in self.guests.tick():
                self.log.debug(
                    "free pages reported",
                    guest=guest.name,
                    batches=run.nr_batches,
                    host_freed_bytes=run.nr_host_pages_freed * 4096,
                )

    def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        if self.observer is not None:
            self.observer.start()
        if self.certificates is None:
            self.grpc_port = self.grpc.add_insecure_port(self.config.listen)
        else:
            self.grpc_port = self.grpc.add_secure_port(
                self.config.listen, self.certificates.credentials()
            )
        if self.config.metrics_listen:
            host, _, port = self.config.metrics_listen.rpartition(":")
            config = self.config
            tls = None
            if config.metrics_tls_cert is not None and config.metrics_tls_key is not None:
                tls = TlsFiles(
                    config.metrics_tls_cert, config.metrics_tls_key, config.metrics_client_ca
                )
            self._metrics = MetricsEndpoint(
                host, int(port), self.registry, tls=tls, token_sha256=config.metrics_token_sha256
            )
            self.metrics_port = self._metrics.port
        self.calls.start()
        self.grpc.start()
        if self.config.dirty_writeback_seconds:
            self._flusher.start()
        self._reporter.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.log.info(
            "started",
            grpc_address=f"{self.config.listen.rpartition(':')[0]}:{self.grpc_port}",
            metrics_port=self.metrics_port,
            tls=self.certificates is not None,
            mtls=self.config.tls_client_ca is not None,
            nr_tokens=None if self.tokens is None else len(self.tokens.table),
        )

    def reload(self) -> None:
        """SIGHUP: rereads the token file (TLS files are reread when they change)."""
        if self.tokens is not None and self.tokens.reload():
            self.machines.set_tenant_limits(self.tokens.table.limits)
        if self._metrics is not None and self._metrics.tls is not None:
            try:
                self._metrics.tls.reload()
            except (OSError, ssl.SSLError) as exc:
                self.log.error("metrics TLS files not reloaded", error=str(exc))
            else:
                self.log.info("metrics TLS files reloaded")

    def stop(self, grace: float | None = None) -> bool:
        """Goes NOT_SERVING, refuses new RPCs, lets in-flight ones finish within the grace,
        then writes every machine's dirty data back and syncs it. grpc gets the grace plus
        STOP_MARGIN_SECONDS to stop; past that the store is synced all the same (a handler
        still running finishes first: it holds its machine's lock). Returns whether grpc
        stopped in time (True also when already stopped)."""
        if self._stopped.is_set():
            return True
        self._stopped.set()
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.log.info("stopping", grace_seconds=grace)
        in_time = self.grpc.stop(grace).wait(grace + STOP_MARGIN_SECONDS)
        if not in_time:
            self.log.warning(
                "grpc did not stop in time", waited_seconds=grace + STOP_MARGIN_SECONDS
            )
        # Threads still inside a handler grpc gave up on exit once it returns.
        self.pool.shutdown(wait=False)
        self.calls.close()
        self._stop_flusher.set()
        if self.observer is not None:
            self.observer.stop()
        for thread in (self._flusher, self._reporter):
            if thread.is_alive():
                thread.join()
        written = 0
        for machine in self.machines:
            with machine.lock:
                if machine.page_cache is not None:
                    written += machine.page_cache.sync()
                    machine.page_cache.store.close()
        self.log.info("synced", nr_pages=written)
        self.state_lock.release()
        if self._metrics is not None:
            self._metrics.stop()
        self.log.info("stopped")
        return in_time

    def wait(self) -> None:
        self.grpc.wait_for_termination()

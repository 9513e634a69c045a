"""The simulated backing devices: per-request latency and bandwidth, by profile name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """Per-request latency and bandwidth of the simulated device."""

    name: str
    read_latency_s: float
    write_latency_s: float
    read_bytes_per_s: float
    write_bytes_per_s: float

    def read_seconds(self, nr_bytes: int) -> float:
        return self.read_latency_s + nr_bytes / self.read_bytes_per_s

    def write_seconds(self, nr_bytes: int) -> float:
        return self.write_latency_s + nr_bytes / self.write_bytes_per_s


# A datacenter NVMe SSD and a 7200 rpm disk; figures are typical datasheet values [estimate].
DEVICE_PROFILES = {
    "nvme": DeviceModel("nvme", 80e-6, 20e-6, 3.0e9, 2.0e9),
    "hdd": DeviceModel("hdd", 8e-3, 8e-3, 180e6, 160e6),
}

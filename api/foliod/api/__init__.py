"""foliod's API beside the generated protobuf code (foliod.v1): what server and client share.

One definition each of the page size, the request limits, the default address, the enums the
API speaks in, the device profiles, the reclaim policy names and the error reasons with their
gRPC codes. Imports no grpc or protobuf, so the domain core may use it too; foliod.api.pb_enums
(which imports protobuf) holds the enums' and op codes' protobuf values, for the rpc layer and
the client.
"""

from foliod.api._devices import DEVICE_PROFILES, DeviceModel
from foliod.api._enums import RECLAIM_POLICIES, Backing, FolioKind, MemmapModel, ThpSetting
from foliod.api._limits import (
    DEFAULT_ADDRESS,
    MAX_BATCH_OPS,
    MAX_BATCH_PAYLOAD_BYTES,
    MAX_IO_BYTES,
    MAX_REPLAY_ACCESSES,
    PAGE_SHIFT,
    PAGE_SIZE,
    parse_size,
)
from foliod.api._reasons import ERROR_DOMAIN, STATUS_CODE_NAMES, Reason

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDRESS",
    "DEVICE_PROFILES",
    "ERROR_DOMAIN",
    "MAX_BATCH_OPS",
    "MAX_BATCH_PAYLOAD_BYTES",
    "MAX_IO_BYTES",
    "MAX_REPLAY_ACCESSES",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "RECLAIM_POLICIES",
    "STATUS_CODE_NAMES",
    "Backing",
    "DeviceModel",
    "FolioKind",
    "MemmapModel",
    "Reason",
    "ThpSetting",
    "__version__",
    "parse_size",
]

"""foliod's Python client (first slice): error mapping from gRPC statuses back to the core's tree.

The full typed client, CLI and load driver are tracked separately; this package already gives
callers the same exceptions the server raised, with status code and google.rpc details.
"""

from foliodclient.errors import RemoteError, error_from_rpc

__all__ = ["RemoteError", "error_from_rpc"]

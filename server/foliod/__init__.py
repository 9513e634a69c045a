"""foliod: a gRPC service that simulates Linux physical memory, folios and the memory map."""

__version__ = "0.1.0"

"""Generated code of the foliod.v1 API (proto/foliod/v1/foliod.proto); regenerate with `make proto`."""

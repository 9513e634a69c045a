"""foliod's rpc layer: servicers, interceptors, status mapping and the metrics adapter."""

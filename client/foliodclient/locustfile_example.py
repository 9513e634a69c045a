"""Example locustfile: page-cache traffic plus allocation churn against one foliod.

    locust -f client/foliodclient/locustfile_example.py --host 127.0.0.1:50051

Locust runs every non-abstract User class defined or imported at the top level of this module;
importing the module (not its classes) keeps the ready-made users out of that list.
"""

from __future__ import annotations

import uuid

from locust import between, task

import foliodclient.locust as foliod


class PageCacheUser(foliod.FoliodPageCacheUser):
    """Reads, writes and fsyncs a 1 MiB file of its own (3 of every 4 users)."""

    weight = 3


class AllocationChurnUser(foliod.FoliodUser):
    """Allocates four anonymous folios of a random order and frees them (1 of every 4 users)."""

    weight = 1
    wait_time = between(0.005, 0.05)

    def on_start(self) -> None:
        self.owner = f"locust-{uuid.uuid4().hex[:16]}"

    @task
    def churn(self) -> None:
        order = self.rng.choice((0, 0, 0, 2, 4, 9))
        allocation = self.client.allocate(self.owner, "anon", order=order, count=4)
        self.client.free(allocation.handles)

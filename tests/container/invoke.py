"""test.sh's stand-in for grand-challenge's platform in invoke mode, run inside the container next to the server
(over the container's own loopback, as the platform's shim calls it):

  python invoke.py health [SECONDS]   wait until GET /health answers 200 (default: up to 300 s, the platform's)
  python invoke.py invoke             POST /invoke; exit 0 when it answers 201

The port is CMB_PORT's, else 4743.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

URL = f"http://127.0.0.1:{os.environ.get('CMB_PORT', '4743')}"


def call(path: str, method: str, timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(URL + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def health(limit: float) -> int:
    start = time.time()
    while time.time() - start < limit:
        try:
            status, _ = call("/health", "GET", timeout=10)
            if status == 200:
                print(f"healthy after {time.time() - start:.0f} s")
                return 0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    print(f"no healthy answer within {limit:.0f} s")
    return 1


def invoke() -> int:
    start = time.time()
    status, body = call("/invoke", "POST", timeout=3600)
    try:
        body = json.dumps(json.loads(body))
    except ValueError:
        pass
    print(f"POST /invoke: {status} after {time.time() - start:.1f} s: {body}")
    return 0 if status == 201 else 1


if __name__ == "__main__":
    if sys.argv[1] == "health":
        sys.exit(health(float(sys.argv[2]) if len(sys.argv) > 2 else 300))
    sys.exit(invoke())

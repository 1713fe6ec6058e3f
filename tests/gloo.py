"""Launch a worker script on several gloo processes on 127.0.0.1, for the torch.distributed tests.

``launch(worker, world, tmp)`` runs ``python -c worker RANK WORLD PORT PATH`` once per rank (a free port on
127.0.0.1, ``GLOO_SOCKET_IFNAME`` the loopback unless set), waits at most ``timeout`` seconds (a hang fails
instead of stalling CI; the worker also gives ``init_process_group`` a timeout), and returns each rank's
report, the JSON the worker wrote to PATH.  A rank that fails fails the test with its output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(worker, world, tmp, timeout=300):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    paths = [str(tmp / f"rank{r}.json") for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, str(r), str(world), port, paths[r]],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    return reports

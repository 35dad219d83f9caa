"""Start the simulator by hand: ``sudo python -m tests.opennebula_sim [--port N] [--slow]``.

Prints the endpoint and a config snippet for ``hpc-compute``; serves until Ctrl-C, then destroys
every VM. Faults can be injected from another shell through the ``sim.*`` XML-RPC methods, e.g.
``python -c "import xmlrpc.client as x; x.ServerProxy(URL).sim.inject({'boot_failure': True}, 1)"``
with URL the printed endpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from tests.opennebula_sim import netns
from tests.opennebula_sim.fixtures import SESSION
from tests.opennebula_sim.server import Delays, Simulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.opennebula_sim", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--slow", action="store_true", help="production-like delays (seconds, not tenths)")
    parser.add_argument("--no-namespaces", action="store_true", help="no VMs with sshd (no root needed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.no_namespaces and os.geteuid() != 0:
        print("the simulator's VMs are network namespaces: run as root (or --no-namespaces)", file=sys.stderr)
        return 2
    delays = Delays(5, 5, 3, 1, 1) if args.slow else Delays(0.3, 0.3, 0.2, 0.2, 0.2)
    sim = Simulator(delays=delays, port=args.port, namespaces=not args.no_namespaces).start()
    print(f"oned simulator listening at {sim.endpoint} (session {SESSION})")
    print("config snippet (~/.config/hpc-compute/config.toml, or HPC_COMPUTE_CONFIG):\n")
    print("[opennebula]")
    print(f'endpoint = "{sim.endpoint}"')
    print(f'session = "{SESSION}"')
    print("template_id = 0")
    print(f'remote_work_dir = "{netns.GUEST_DISK}/work"')
    print("provision_poll_s = 0.5\nprobe_interval_s = 1\npool_refresh_s = 1\n")
    print("then: hpc-compute submit --backend opennebula -- /bin/echo hello   (and hpc-compute serve)")
    sys.stdout.flush()
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

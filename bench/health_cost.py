"""What the health checks cost the packet loop: CPU per call of each plane service when
nothing is due (the common case: the loop calls the plane every 5 ms while forwarding, because
the control channel asks for it), in-process over loopback sockets, no root.

    .venv/bin/python -m bench.health_cost [--calls 20000]
"""

from __future__ import annotations

import argparse
import socket
import time

from agent.healthsvc import AgentHealth
from fastpath.healthsvc import LbHealth
from l4lb.healthcfg import HealthConfig

BACKENDS = ["10.2.3.2", "10.4.7.2", "10.6.11.2", "10.8.15.2"]
PLANE_EVERY = 0.005  # fastpath.runner.CONTROL_EVERY


class Targets:
    def probe_targets(self) -> list[str]:
        return BACKENDS

    def set_health(self, ip: str, healthy: bool, now: float, reason: str) -> bool:
        return False


class Discard:
    """A tunnel socket that sends nowhere."""

    def setblocking(self, flag: bool) -> None:
        pass

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        return len(data)

    def close(self) -> None:
        pass


def per_call(service: object, calls: int) -> float:
    run = service.service  # type: ignore[attr-defined]
    t0 = time.thread_time()
    for _ in range(calls):
        run(time.monotonic())
    return (time.thread_time() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    replies = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    replies.bind(("127.0.0.1", 0))
    lb = LbHealth(
        HealthConfig(), Targets(), "127.0.0.1", "127.0.0.1", time.monotonic(),
        tunnel=Discard(), replies=replies,  # type: ignore[arg-type]
    )  # fmt: skip
    responder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    responder.bind(("127.0.0.1", 0))
    agent = AgentHealth(
        HealthConfig(), "127.0.0.1", BACKENDS[0], time.monotonic(), responder=responder,
        check_addr=("127.0.0.1", 1),
    )  # fmt: skip
    agent.next_check = float("inf")  # nothing due: the steady state between two checks
    for name, svc in (("LbHealth (4 backends)", lb), ("AgentHealth", agent)):
        cost = per_call(svc, args.calls)
        print(
            f"{name}: {cost * 1e6:.2f} us CPU per call; at one call per "
            f"{PLANE_EVERY * 1000:.0f} ms: {cost / PLANE_EVERY * 100:.3f}% of a core"
        )
    lb.close()
    agent.close()


if __name__ == "__main__":
    main()

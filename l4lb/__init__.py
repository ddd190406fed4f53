"""What the load balancer (fastpath) and the host agent (agent) share: the wire formats and the
I/O layer (rings, BPF, transmit, busy-polling, RPS steering, stats files). Imports neither of
them, nor the controller."""

"""Routing controller: topology, ECMP/VIP route computation, Linux and P4 drivers, network CLI."""

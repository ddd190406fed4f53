"""Metrics of the data planes: the Prometheus exporter that runs beside each load balancer and
agent (monitor.exporter), its table of metrics (monitor.mapping) and what it reads
(monitor.view, monitor.sources). It imports the data planes' configuration and l4lb, never the
controller."""

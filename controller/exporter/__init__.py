"""Metrics of the data planes: the Prometheus exporter that runs beside each load balancer and
agent, inside its host (`python -m controller.exporter`), its table of metrics (mapping) and
what it reads (view, sources). It imports the data planes' configuration and l4lb, and nothing
else of the controller: it runs in a host, not where the controller runs."""

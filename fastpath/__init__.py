"""The load balancer: AF_PACKET ring receive, flow-hash backend choice, IP-in-IP encapsulation."""

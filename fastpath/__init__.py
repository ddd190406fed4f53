"""The load balancer: AF_PACKET receive, Maglev backend choice, IP-in-IP encapsulation."""

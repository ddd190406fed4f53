"""The host agent on every backend: VIP on the host, IP-in-IP decapsulation, local delivery."""

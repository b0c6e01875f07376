"""Real-Kubernetes test infrastructure (local API server, fake kubelet)."""

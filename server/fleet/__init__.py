"""loraplex as replicas on Ray Serve, with adapter-affinity routing (`loraplex fleet`)."""

"""Fault sweep of an active-active pair: nodes in network namespaces, a seeded nemesis,
libnbd clients through the host agent and directly against both nodes, and a checker
for lost, stale, corrupt and divergent data (see bench/README.md, "Fault sweep")."""

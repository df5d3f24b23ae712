"""Replication between nodes: peer links, pairs, the mirrored write path, resync."""

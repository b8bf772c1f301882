"""Ray programs over segpc: segment (Ray Data), train (Ray Train), report; plus local helpers."""

"""Developer and test tooling that is not part of the installable package: a local multi-node Ray
(`cluster/local/start.sh` runs tools/local_cluster.py) and a Ray Jobs client for the cluster tests."""

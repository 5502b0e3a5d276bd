"""`pdserve up` on one machine: the deployment file and flags (config), the worker and router
processes (procs), restarts (supervise) and the whole local cluster (cluster)."""

"""`pdserve bench`: a serving benchmark shaped like `vllm bench serve`.

workloads.py builds requests (random, ShareGPT, shared-prefix multi-turn, JSONL traces);
runner.py sends them on an arrival schedule; client.py times one streamed request;
metrics.py turns records (measured here, or simulated by pdserve.sim) into TTFT/ITL/TPOT/E2E
statistics and goodput; report.py and
plots.py present them; deploy.py and compare.py run the same workload against local
`pdserve up` deployments in turn. No torch: this is a client.
"""

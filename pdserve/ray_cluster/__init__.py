"""pdserve on a Ray cluster: `pdserve up --ray ADDRESS` and `pdserve scale --ray ADDRESS`.

Ray places the workers (one actor per worker, by role through resources), restarts them
(max_restarts) and tells where they run; pdserve adds only what Ray does not know: which URL
each worker serves on, when it is healthy, and draining before a worker is removed. Nothing
here is imported on the non-Ray path (`ray` is an optional dependency).
"""

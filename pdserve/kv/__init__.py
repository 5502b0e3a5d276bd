"""KV hand-off between a prefill worker (producer) and a decode worker (consumer).

The connector decides what to send (a request's held blocks, minus what the decode side's
prefix cache already holds); the transports decide how (tcp, shm, cuda_ipc, nixl). This
package knows the engine's block layout, never HTTP.
"""

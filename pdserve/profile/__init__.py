"""Measurement on real hardware: step-time profiles and P/D calibration that the simulator reads
(pdserve.sim never runs the engine's model itself)."""

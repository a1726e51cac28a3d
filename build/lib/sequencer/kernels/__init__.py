"""Hand-written kernels behind `sequencer.recurrence`: oneDNN matmuls on the CPU."""

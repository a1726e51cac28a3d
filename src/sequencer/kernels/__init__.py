"""Hand-written kernels behind `sequencer.recurrence`: oneDNN matmuls on the CPU, the Triton scan on the GPU."""

"""The contracts every process of a job shares, and nothing else: it imports no other project code.

- `phases`: the phase states, the phase table (who completes each phase) and the pure transitions;
- `acks`: the typed payloads a phase's owner reports when it completes the phase;
- `weight_region`: the shared-memory weight-region format (manifest, alignment, checksums), its
  writer (trainer EXPORT) and its verified reader (vLLM's worker extension);
- `vllm_protocol`, `vllm_client`: the vLLM sidecar's HTTP messages and client;
- `engine_client`: how the trainer and the controller talk to their node's checkpoint engine;
- `run_dir`: the run directory's layout.
"""

"""vLLM worker extension: loads pushed weights into a live engine that started with dummy weights.

vLLM's CPU backend repacks linear weights after loading, so `model.load_weights()` on a live
engine fails; `Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)` runs the
full loader path (HF names in, repacking after) and works on CPU and GPU alike.
Called from the engine process through `collective_rpc("<method>", args=...)`.
"""

from __future__ import annotations

from checkpoint_engine.contracts.weight_region import Manifest, WeightVerificationError, read_region


class WeightReceiverExtension:
    """Mixed into vLLM's Worker via `worker_extension_cls`."""

    loaded_version: int = -1

    def load_from_shm(self, manifest_dict: dict) -> int:
        """Load every tensor of a `Manifest` (as `to_dict()`: RPC arguments cross processes as
        plain data) from shared memory, each verified against its checksum; returns the version
        now live. A version not newer than the loaded one is refused."""
        manifest = Manifest.from_dict(manifest_dict)
        if manifest.version <= self.loaded_version:
            raise WeightVerificationError(
                f"weight version {manifest.version} is stale: version {self.loaded_version} is already loaded"
            )
        tensors = read_region(manifest)  # verified before any is loaded
        self.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        self.loaded_version = manifest.version
        return self.loaded_version

    def load_from_safetensors(self, path: str, version: int) -> int:
        """The naive path, kept as the benchmark's baseline: read a safetensors file and reload."""
        from safetensors.torch import load_file

        self.reload_weights(weights_iterator=iter(load_file(path).items()), is_checkpoint_format=True)
        self.loaded_version = version
        return version

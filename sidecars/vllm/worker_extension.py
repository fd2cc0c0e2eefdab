"""vLLM worker extension: loads pushed weights into a live engine that started with dummy weights.

vLLM's CPU backend repacks linear weights after loading, so `model.load_weights()` on a live
engine fails; `Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)` runs the
full loader path (HF names in, repacking after) and works on CPU and GPU alike, but for one
gap: MoE experts on CPU (`repack_cpu_moe_experts`).
Called from the engine process through `collective_rpc("<method>", args=...)`.
"""

from __future__ import annotations

from checkpoint_engine.contracts.weight_region import Manifest, WeightVerificationError, read_region


class WeightReceiverExtension:
    """Mixed into vLLM's Worker via `worker_extension_cls`."""

    loaded_version: int = -1

    def load_region(self, manifest_dict: dict) -> int:
        """Load every tensor of a `Manifest` (as `to_dict()`: RPC arguments cross processes as
        plain data) from its region (shared memory, or GPU memory by CUDA IPC), each verified against
        its checksum; returns the version now live. A version not newer than the loaded one is refused."""
        manifest = Manifest.from_dict(manifest_dict)
        if manifest.version <= self.loaded_version:
            raise WeightVerificationError(
                f"weight version {manifest.version} is stale: version {self.loaded_version} is already loaded"
            )
        tensors = read_region(manifest)  # verified before any is loaded
        self._reload(iter(tensors))
        del tensors  # a GPU region's views: the mapping closes with them, before the trainer frees the region
        self.loaded_version = manifest.version
        return self.loaded_version

    def load_from_safetensors(self, path: str, version: int) -> int:
        """The naive path, kept as the benchmark's baseline: read a safetensors file and reload."""
        from safetensors.torch import load_file

        self._reload(iter(load_file(path).items()))
        self.loaded_version = version
        return version

    def _reload(self, tensors) -> None:  # tensors: Iterator[tuple[str, torch.Tensor]]
        self.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
        repack_cpu_moe_experts(self.model_runner.model)


def repack_cpu_moe_experts(model) -> int:  # model: torch.nn.Module; returns the layers repacked
    """Prepack reloaded MoE expert weights into the CPU kernel's grouped-gemm layout.

    vLLM (0.32) prepacks a CPU MoE layer's `w13_weight`/`w2_weight` once, when the kernel is first
    built (`UnquantizedFusedMoEMethod._setup_kernel` calls `fused_experts.process_weights_after_loading`
    only when `moe_kernel` is None). A reload copies the new weights in checkpoint layout into the
    packed storage and skips that step, so the kernel reads them as if packed: the output is wrong,
    silently. Running the experts' own step again packs them. GPU experts do no such packing and
    are left alone.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    repacked = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            repacked += 1
    return repacked

"""Run under torchrun (2 ranks) by test_megatron.py: one training step of a small GPTModel split over two
pipeline stages through megatron-core's own 1F1B schedule, on CPU with gloo. The trainer refuses
pipeline parallelism because this does not run on CPU; the test checks that it still does not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidecars.megatron import compat
from sidecars.megatron.parallel import ParallelConfig, init_distributed, shutdown

BATCH, SEQ, VOCAB = 2, 16, 128


def main() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    init_distributed(ParallelConfig(pipeline_parallel=2))
    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=2,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    batches = iter(torch.randint(0, VOCAB, (4, BATCH, SEQ), generator=torch.Generator().manual_seed(0)))

    def forward_step(data, stage):
        positions = torch.arange(SEQ).expand(BATCH, SEQ)
        output = stage(next(data), positions, compat.causal_mask(SEQ))
        return output, lambda out: (out.float().mean(), {})

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=model,
        num_microbatches=4,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    print("pipeline step done")
    shutdown()


if __name__ == "__main__":
    main()

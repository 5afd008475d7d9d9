import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer LlamaForCausalLM (hidden 128, GQA 4/2) whose activations look like a trained
    model's in the one way that matters for GPTQ: a few input channels carry much larger values
    (outlier features), so the Hessian is far from isotropic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :6] *= 15.0
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[:4] *= 8.0
    return model


@pytest.fixture(scope="session")
def fp_package(tmp_path_factory):
    """A tiny exported LLaVA package (GQA preset) and its checkpoint."""
    from llava_edge.export.exporter import export_package
    from llava_edge.export.factory import build_checkpoint

    root = tmp_path_factory.mktemp("llava")
    build_checkpoint(root / "ckpt", "llava-hf-gqa")
    export_package(root / "ckpt", root / "pkg")
    return root / "pkg", root / "ckpt"

"""Greedy generation with attnkit as a Hugging Face transformers attention implementation.

A tiny random-weight Llama, built from a config (nothing downloaded), generates a few tokens
for a left-padded batch with attn_implementation="attnkit" and with "sdpa", and prints both
and whether they are equal. Run from the repository root:

    PYTHONPATH=python python examples/hf_generate.py
"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from attnkit.integrations import transformers as attnkit_hf


def main():
    attnkit_hf.register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnkit").eval()
    prompts = torch.tensor([[0, 0, 5, 17, 42, 9], [3, 14, 15, 92, 65, 35]])   # row 0 is left-padded
    mask = (prompts != 0).long()
    new_tokens = {}
    for implementation in ("attnkit", "sdpa"):
        model.set_attn_implementation(implementation)
        out = model.generate(prompts, attention_mask=mask, max_new_tokens=8, do_sample=False)
        new_tokens[implementation] = out[:, prompts.shape[1]:]
        print(f"{implementation:8s} {new_tokens[implementation].tolist()}")
    print("equal:", torch.equal(new_tokens["attnkit"], new_tokens["sdpa"]))


if __name__ == "__main__":
    main()

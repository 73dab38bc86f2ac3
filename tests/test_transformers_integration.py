"""attnkit.integrations.transformers: tiny random-weight models built from configs (nothing
downloaded) give transformers' sdpa results (eager for Gemma 2, whose softcap sdpa lacks):
logits, gradients, greedy generate(), continuous batching; fallbacks warn once."""
import collections
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import attnkit

transformers = pytest.importorskip("transformers")
from attnkit.integrations import transformers as attnkit_hf  # noqa: E402
from transformers import masking_utils  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Any attnkit fallback warning in a test that does not expect one fails it.
pytestmark = pytest.mark.filterwarnings("error:attnkit")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=None)
# Sliding windows (5) shorter than the sequences; Gemma 2 alternates sliding and full layers,
# Qwen 2 has a full layer then a sliding one.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=5),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                                attn_logit_softcapping=5.0, final_logit_softcapping=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=1),
}
REFERENCE = {"gemma2": "eager"}   # transformers' sdpa raises on softcap


@pytest.fixture(scope="module", autouse=True)
def registered():
    attnkit_hf.register()


@pytest.fixture
def calls(monkeypatch):
    """Counts the attnkit ops the integration calls."""
    counts = collections.Counter()
    for name in ("attention", "attention_varlen", "decode"):
        def counted(*args, _op=getattr(attnkit, name), _name=name, **kwargs):
            counts[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(attnkit, name, counted)
    return counts


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(attnkit_hf, "_WARNED", set())


def model_for(name, **overrides):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def batch(padding, seqlen=12):
    """Token ids (3, seqlen) and their mask: rows 1 and 2 padded on the `padding` side."""
    ids = torch.randint(1, COMMON["vocab_size"], (3, seqlen), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :4], mask[2, :7] = 0, 0
    elif padding == "right":
        mask[1, -4:], mask[2, -7:] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


def rel_err(a, b):
    return ((a - b).double().norm() / b.double().norm()).item()


def run(model, implementation, fn):
    model.set_attn_implementation(implementation)
    return fn()


def test_import_attnkit_does_not_import_transformers():
    code = "import sys, attnkit, attnkit.integrations; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "python")})


def test_register_is_idempotent():
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

    assert attnkit_hf.register() == attnkit_hf.register() == "attnkit"
    assert transformers.AttentionInterface._global_mapping["attnkit"] is attnkit_hf.attnkit_attention_forward
    assert transformers.AttentionMaskInterface._global_mapping["attnkit"] is attnkit_hf.attnkit_mask
    switch = ContinuousBatchingManager.switch_to_cb_friendly_attn
    assert switch._keeps_attnkit and not getattr(switch.__wrapped__, "_keeps_attnkit", False)


def test_ways_to_select_attnkit(tmp_path):
    model = model_for("llama")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnkit")
    config = CONFIGS["llama"]()
    config._attn_implementation = "attnkit"
    built = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("attnkit")
    with pytest.warns(FutureWarning, match="paged"):   # transformers 5.22 drops the deprecated prefix
        prefixed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="paged|attnkit")
    for m in (loaded, built, model, prefixed):
        assert m.config._attn_implementation == "attnkit"
    ids, mask = batch("left")
    with torch.no_grad():
        assert rel_err(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits) == 0


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match(name, padding, calls):
    model, (ids, mask) = model_for(name), batch(padding)
    reference = REFERENCE.get(name, "sdpa")
    with torch.no_grad():
        want = run(model, reference, lambda: model(ids, attention_mask=mask).logits)
        got = run(model, "attnkit", lambda: model(ids, attention_mask=mask).logits)
    present = mask.bool()
    assert rel_err(got[present], want[present]) <= 1e-5
    assert calls["attention_varlen" if padding != "none" else "attention"] == COMMON["num_hidden_layers"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match(name):
    model, (ids, mask) = model_for(name), batch("left")
    model.train()
    # A loss over predictions from present tokens only: a padded position's output is arbitrary.
    labels = ids.masked_fill((mask == 0) | (mask.roll(1, 1) == 0), -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    want_loss, want = run(model, REFERENCE.get(name, "sdpa"), loss_and_grads)
    got_loss, got = run(model, "attnkit", loss_and_grads)
    assert rel_err(got_loss, want_loss) <= 1e-5
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_matches(name, padding, calls):
    model, (ids, mask) = model_for(name), batch(padding, seqlen=10)
    reference = REFERENCE.get(name, "sdpa")

    def generate():
        return model.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False)

    want = run(model, reference, generate)
    got = run(model, "attnkit", generate)
    assert got.shape == (3, 42) and torch.equal(got, want)
    assert calls["attention_varlen" if padding == "left" else "decode"] > 0


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_generate_static_cache(name, padding, calls):
    model, (ids, mask) = model_for(name), batch(padding, seqlen=8)

    def generate():
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              cache_implementation="static")

    assert torch.equal(run(model, "attnkit", generate), run(model, "sdpa", generate))
    assert calls["attention_varlen" if padding == "left" else "decode"] > 0


@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_sequences(use_cache, calls):
    """Sequences packed in one row (position ids restart): transformers masks across them only
    without a cache; attnkit follows its mask."""
    model, (ids, _) = model_for("mistral"), batch("none")
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])

    def logits():
        return model(ids[:1], position_ids=positions, use_cache=use_cache).logits

    with torch.no_grad():
        assert rel_err(run(model, "attnkit", logits), run(model, "sdpa", logits)) <= 1e-5
    assert calls["attention_varlen" if not use_cache else "attention"] == COMMON["num_hidden_layers"]


def test_packed_sequences_fall_back_with_their_mask(fresh_warnings):
    model, (ids, _) = model_for("mistral"), batch("none")
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])

    def attentions():
        return model(ids[:1], position_ids=positions, use_cache=False, output_attentions=True).attentions

    with torch.no_grad():
        want = run(model, "eager", attentions)
        with pytest.warns(UserWarning, match="attnkit: output_attentions"):
            got = run(model, "attnkit", attentions)
    assert all(rel_err(g, w) <= 1e-5 for g, w in zip(got, want, strict=True))


@pytest.mark.filterwarnings("ignore:The `paged|` prefix:FutureWarning")
@pytest.mark.parametrize("name, page_size", [("llama", 4), ("mistral", 7), ("gemma2", 16)])
def test_generate_batch_paged(name, page_size, calls):
    """Continuous batching on transformers' PagedAttentionCache, chunked prefill included
    (max_batch_tokens below the prompts' total)."""
    model = model_for(name)
    prompts = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45], [6, 7, 8], [9] * 20]
    config = transformers.GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb_config = ContinuousBatchingConfig(page_size=page_size, num_blocks=64, max_batch_tokens=16)

    def generate():
        out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config)
        return [out[key].generated_tokens for key in sorted(out)]

    want = run(model, "paged|" + REFERENCE.get(name, "sdpa"), generate)
    got = run(model, "paged|attnkit", generate)
    assert model.config._attn_implementation == "attnkit"
    assert [len(t) for t in got] == [12] * 3 and got == want
    assert calls["attention_varlen"] > 0


def test_output_attentions_falls_back_to_eager(fresh_warnings):
    model, (ids, mask) = model_for("llama"), batch("left")
    with torch.no_grad():
        want = run(model, "eager", lambda: model(ids, attention_mask=mask, output_attentions=True))
        with pytest.warns(UserWarning, match="attnkit: output_attentions") as record:
            got = run(model, "attnkit", lambda: model(ids, attention_mask=mask, output_attentions=True))
    assert len([w for w in record if "attnkit" in str(w.message)]) == 1   # one warning for both layers
    present = mask.bool()
    assert rel_err(got.logits[present], want.logits[present]) <= 1e-5
    for got_weights, want_weights in zip(got.attentions, want.attentions, strict=True):
        rows = present[:, None, :, None].expand_as(want_weights)
        assert rel_err(got_weights[rows], want_weights[rows]) <= 1e-5


def test_dropout_falls_back_to_sdpa(fresh_warnings):
    model, (ids, mask) = model_for("llama", attention_dropout=0.5), batch("none")
    model.train()

    def logits():
        torch.manual_seed(3)
        return model(ids, attention_mask=mask).logits

    want = run(model, "sdpa", logits)
    with pytest.warns(UserWarning, match="attnkit: attention dropout"):
        got = run(model, "attnkit", logits)
    assert rel_err(got, want) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once per reason
        run(model, "attnkit", logits)


def test_custom_4d_mask_falls_back_to_sdpa(fresh_warnings):
    model, (ids, _) = model_for("llama"), batch("none")
    mask = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(2)) > 0.3
    mask |= torch.eye(12, dtype=torch.bool)
    with torch.no_grad():
        want = run(model, "sdpa", lambda: model(ids, attention_mask=mask).logits)
        with pytest.warns(UserWarning, match="attnkit: a 4-D attention mask"):
            got = run(model, "attnkit", lambda: model(ids, attention_mask=mask).logits)
    assert rel_err(got, want) <= 1e-5


def test_sliding_window_over_padding_holes_falls_back(fresh_warnings):
    """A window counts positions, attnkit would count present keys: not the same past a hole."""
    model, (ids, mask) = model_for("mistral"), batch("none")
    mask[0, 3:6] = 0
    with torch.no_grad():
        want = run(model, "sdpa", lambda: model(ids, attention_mask=mask).logits)
        with pytest.warns(UserWarning, match="attnkit: a sliding window over a padding mask with holes"):
            got = run(model, "attnkit", lambda: model(ids, attention_mask=mask).logits)
    present = mask.bool()
    assert rel_err(got[present], want[present]) <= 1e-5


@pytest.mark.parametrize("padding", ["none", "left"])
def test_attention_sinks_native(padding, fresh_warnings):
    """gpt-oss's learned sinks (s_aux) on attnkit's lse: logits and gradients equal eager's."""
    config = transformers.GptOssConfig(**{**COMMON, "num_hidden_layers": 2}, head_dim=16, num_local_experts=2,
                                       num_experts_per_tok=1, sliding_window=5,
                                       layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for layer in model.model.layers:  # random sinks, not the zeros of a fresh model
        torch.nn.init.normal_(layer.self_attn.sinks)
    ids, mask = batch(padding)
    present = mask.bool()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        got = run(model, "attnkit", lambda: model(ids, attention_mask=mask).logits)
        got_grad = torch.autograd.grad(got[present].square().sum(), model.model.layers[0].self_attn.sinks)[0]
    want = run(model, "eager", lambda: model(ids, attention_mask=mask).logits)
    want_grad = torch.autograd.grad(want[present].square().sum(), model.model.layers[0].self_attn.sinks)[0]
    assert rel_err(got[present], want[present]) <= 1e-5
    assert rel_err(got_grad, want_grad) <= 1e-4


@pytest.mark.parametrize("pattern", ["chunked", "overlay"])
def test_mask_patterns_attnkit_cannot_express_get_sdpas_mask(pattern):
    causal = masking_utils.causal_mask_function
    mask_function = (masking_utils.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))
                     if pattern == "chunked" else masking_utils.or_masks(causal, lambda b, h, q, kv: kv == 0))
    padding = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    kwargs = dict(batch_size=2, q_length=6, kv_length=6, mask_function=mask_function, attention_mask=padding)
    got = attnkit_hf.attnkit_mask(**kwargs)
    assert got.shape == (2, 1, 6, 6) and torch.equal(got, masking_utils.sdpa_mask(**kwargs, allow_is_causal_skip=False))


def test_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_generate.py")], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "python")}).stdout
    assert "equal: True" in out, out

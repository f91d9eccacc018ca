import torch

from bench.lecture import PerHeadGPT, fused_state_dict, per_head_state_dict
from chargpt.model import GPT, GPTConfig, reference_generate
from chargpt.sampling import SamplingParams

CONFIG = GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=4, n_layer=2)


def test_lecture_defaults_give_the_lectures_model_size() -> None:
    config = GPTConfig(vocab_size=65)
    model = GPT(config)
    assert model.num_parameters() == sum(p.numel() for p in PerHeadGPT(config).parameters())
    assert round(model.num_parameters() / 1e6, 2) == 0.41  # the lecture's "0.41 M parameters"


def test_logits_shape_and_loss() -> None:
    model = GPT(CONFIG)
    idx = torch.randint(11, (3, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 8, 11)
    assert loss is not None and loss.ndim == 0
    # An untrained model is close to uniform: loss near ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(11.0)).item()) < 0.5


def test_changing_a_future_character_never_changes_earlier_logits() -> None:
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    idx = torch.randint(11, (1, 8))
    base, _ = model(idx)
    for t in range(8):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 11
        logits, _ = model(changed)
        torch.testing.assert_close(logits[0, :t], base[0, :t], rtol=0, atol=0)
        assert not torch.allclose(logits[0, t:], base[0, t:])


def test_fused_attention_equals_per_head_reference() -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=4, n_layer=2)
    reference = PerHeadGPT(config).eval()
    # Random (not initial) weights everywhere, so every parameter matters.
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    fused = GPT(config).eval()
    fused.load_state_dict(fused_state_dict(reference))
    idx = torch.randint(11, (4, 8))
    expected, expected_loss = reference(idx, idx)
    got, got_loss = fused(idx, idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_loss, expected_loss)
    # Shorter sequences too (the per-head mask is sliced, SDPA is causal).
    torch.testing.assert_close(fused(idx[:, :3])[0], reference(idx[:, :3])[0], rtol=1e-5, atol=1e-5)
    # And back: the inverse mapping restores the per-head model exactly.
    restored = PerHeadGPT(config)
    restored.load_state_dict(per_head_state_dict(fused))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_sequences_longer_than_block_size_are_refused() -> None:
    model = GPT(CONFIG)
    try:
        model(torch.zeros(1, 9, dtype=torch.long))
    except ValueError as exc:
        assert "block_size" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_reference_generate_crops_to_block_size() -> None:
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    prompt = [1, 2, 3]
    new = reference_generate(model, prompt, 20, SamplingParams(temperature=0))
    assert len(new) == 20
    # Recompute every step by hand: the argmax of the last position of the last 8 tokens.
    ids = list(prompt)
    for _ in range(20):
        logits, _ = model(torch.tensor([ids[-8:]]))
        ids.append(int(logits[0, -1].argmax()))
    assert new == ids[3:]


def test_reference_generate_is_reproducible_with_a_seed() -> None:
    model = GPT(CONFIG).eval()
    params = SamplingParams(temperature=1.0)
    a = reference_generate(model, [0], 30, params, seed=7)
    b = reference_generate(model, [0], 30, params, seed=7)
    c = reference_generate(model, [0], 30, params, seed=8)
    assert a == b
    assert a != c


def test_every_way_of_loading_leaves_the_model_computing_with_the_loaded_weights() -> None:
    """Copying into the parameters, assigning new ones and converting them."""
    torch.manual_seed(0)
    source, idx = GPT(CONFIG).eval(), torch.randint(11, (2, 8))
    expected, _ = source(idx)

    copied = GPT(CONFIG).eval()
    copied.load_state_dict(source.state_dict())
    assigned = GPT(CONFIG).eval()
    assigned.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=True)
    converted = GPT(CONFIG).eval()
    converted.load_state_dict(source.state_dict())
    converted.to(torch.float64).to(torch.float32)
    for model in (copied, assigned, converted):
        torch.testing.assert_close(model(idx)[0], expected, rtol=1e-6, atol=1e-6)


def test_tensor_names_are_those_every_checkpoint_was_written_with() -> None:
    """The modules are nanoGPT-shaped; the names in the file are unchanged since 0.1."""
    names = set(GPT(CONFIG).state_dict())
    for layer in range(CONFIG.n_layer):
        block = f"blocks.{layer}."
        expected_block = {
            block + name
            for name in (
                "ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.proj.weight",
                "attn.proj.bias", "ln2.weight", "ln2.bias", "ffwd.fc.weight", "ffwd.fc.bias",
                "ffwd.proj.weight", "ffwd.proj.bias",
            )
        }  # fmt: skip
        assert expected_block <= names
    head = {
        "token_embedding.weight", "position_embedding.weight", "ln_f.weight", "ln_f.bias",
        "lm_head.weight", "lm_head.bias",
    }  # fmt: skip
    assert head <= names and len(names) == len(head) + 11 * CONFIG.n_layer

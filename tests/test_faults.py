"""Fault injection: whatever goes wrong inside an intervention (or a pair of nested ones),
the model comes back exactly as it was.

For every intervention (bidirectional swap of all layers / one layer / single heads,
position-0 replacement of each kind, and the RoPE controls of
``rope_leak.interventions.rope`` when that module exists) and every ordered pair of them
(the same one twice included), each fault below is injected and the model is then
compared with a snapshot taken before: outputs bit-identical, ``state_dict`` and every
buffer (persistent or not) bit-identical, the same hook registrations (TransformerLens
hook points and raw torch hooks, by handle id), the same instance attributes of every
module (nothing added, removed or swapped), the same config.

Faults: an exception in the body; KeyboardInterrupt in the body; an exception raised
from inside a hook during a forward pass; KeyboardInterrupt from inside a hook; an
exception while entering the nested contexts (after the first ones are entered); and,
for the bidirectional swap, a failure half-way through its own entry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools

import pytest
import torch

from rope_leak.backends import tiny_rope_model
from rope_leak.interventions.mask import bidirectional
from rope_leak.interventions.position_zero import replace_position_zero

INTERVENTIONS = {
    "bidirectional_all": lambda m: bidirectional(m),
    "bidirectional_layer1": lambda m: bidirectional(m, layers=[1]),
    "bidirectional_heads": lambda m: bidirectional(m, heads={0: [2], 1: [0, 3]}),
    "bos_token": lambda m: replace_position_zero(m, "token", token_id=7),
    "bos_token_norm": lambda m: replace_position_zero(m, "token", token_id=7, norm_matched=True),
    "bos_mean": lambda m: replace_position_zero(m, "mean"),
    "bos_zeros": lambda m: replace_position_zero(m, "zeros"),
    "bos_noise": lambda m: replace_position_zero(m, "noise", seed=3),
}

HAS_ROPE_CONTROLS = importlib.util.find_spec("rope_leak.interventions.rope") is not None
if HAS_ROPE_CONTROLS:  # the RoPE controls (branch arch); tested as soon as they exist
    from rope_leak.interventions import rope as _rope

    _ROPE = {
        "rope_identity": ("identity_rope", {}),
        "rope_scrambled": ("scrambled_rope", {"seed": 1}),
        "rope_base": ("rope_base", {"base": 500.0}),
        "rope_scaling_linear": ("rope_scaling", {"kind": "linear", "factor": 4.0}),
        "rope_scaling_ntk": ("rope_scaling", {"kind": "ntk_by_parts", "factor": 4.0,
                                              "original_ctx_len": 16}),
    }
    for _name, (_func, _kwargs) in _ROPE.items():
        if hasattr(_rope, _func):
            INTERVENTIONS[_name] = (
                lambda m, f=getattr(_rope, _func), kw=_kwargs: f(m, **kw)
            )

PAIRS = list(itertools.product(INTERVENTIONS, repeat=2))


class Boom(RuntimeError):
    pass


# ------------------------------------------------------------------------------ snapshot


def _attribute(value):
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.detach().clone())
    return ("object", id(value))


def snapshot(model: torch.nn.Module) -> dict:
    """Everything an intervention could leave changed."""
    modules = {}
    for name, module in model.named_modules():
        attrs = {
            key: _attribute(value)
            for key, value in vars(module).items()
            if key not in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
            and not key.endswith("_hooks") and not key.endswith("hooks_with_kwargs")
            and not key.endswith("hooks_always_called")
        }
        hooks = {
            key: tuple(getattr(module, key).keys())
            for key in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                        "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
            if hasattr(module, key)
        }
        for key in ("fwd_hooks", "bwd_hooks"):  # TransformerLens HookPoint handles
            if hasattr(module, key):
                hooks[key] = tuple(id(h) for h in getattr(module, key))
        modules[name] = {
            "attrs": attrs,
            "hooks": hooks,
            "parameters": tuple(module._parameters),
            "buffers": tuple(module._buffers),
            "non_persistent": tuple(sorted(module._non_persistent_buffers_set)),
        }
    return {
        "modules": modules,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "cfg": repr(model.cfg.to_dict()),
        "global_rng": torch.random.get_rng_state(),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["cfg"] == after["cfg"]
    assert before["requires_grad"] == after["requires_grad"]
    for kind in ("state_dict", "buffers"):
        assert before[kind].keys() == after[kind].keys(), kind
        for key, value in before[kind].items():
            other = after[kind][key]
            assert value.dtype == other.dtype and value.device == other.device, key
            assert torch.equal(value, other), f"{kind} {key} changed"
    assert before["modules"].keys() == after["modules"].keys()
    for name, info in before["modules"].items():
        other = after["modules"][name]
        assert info["hooks"] == other["hooks"], f"hooks of {name!r}: {info['hooks']} -> {other['hooks']}"
        assert info["parameters"] == other["parameters"] and info["buffers"] == other["buffers"], name
        assert info["non_persistent"] == other["non_persistent"], name
        assert info["attrs"].keys() == other["attrs"].keys(), (
            f"attributes of {name!r}: {sorted(set(info['attrs']) ^ set(other['attrs']))}")
        for key, value in info["attrs"].items():
            new = other["attrs"][key]
            if isinstance(value, tuple) and value[0] == "tensor":
                assert new[0] == "tensor" and value[1:3] == new[1:3], (name, key)
                assert torch.equal(value[3], new[3]), (name, key)
            else:
                assert value == new, f"{name}.{key}: {value!r} -> {new!r}"
    assert torch.equal(before["global_rng"], after["global_rng"]), "global RNG state changed"


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny forward passes: one thread is ~10x faster than a contended pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_rope_model(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=32, d_vocab=50, seed=5)


@pytest.fixture(scope="module")
def tokens():
    out = torch.randint(1, 50, (3, 16), generator=torch.Generator().manual_seed(2))
    out[:, 0] = 0
    return out


@pytest.fixture(scope="module")
def reference(model, tokens):
    """Outputs and snapshot of the untouched model, taken once: every test compares with
    them, so a leak in one test would also fail the tests after it."""
    with torch.no_grad():
        return model(tokens), snapshot(model)


def nested(model, factories):
    """Enter ``factory(model)`` for each factory, in order, on one ExitStack."""
    stack = contextlib.ExitStack()
    try:
        for factory in factories:
            stack.enter_context(factory(model))
    except BaseException:
        stack.close()
        raise
    return stack


def _raise_in_hook(exc):
    def hook(activation, hook):
        raise exc

    return hook


def inject(fault: str, model, tokens, factories) -> None:
    """Run the interventions ``factories`` nested around a body that fails as ``fault`` says."""
    if fault == "body_error":
        with pytest.raises(Boom):
            with nested(model, factories):
                model(tokens)
                raise Boom("body")
    elif fault == "body_interrupt":
        with pytest.raises(KeyboardInterrupt):
            with nested(model, factories):
                model(tokens)
                raise KeyboardInterrupt
    elif fault in ("hook_error", "hook_interrupt"):
        exc = Boom("hook") if fault == "hook_error" else KeyboardInterrupt()
        with pytest.raises(type(exc)):
            with nested(model, factories):
                # Raised in the middle of the forward pass, after layer 0 ran.
                model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", _raise_in_hook(exc))])
    elif fault == "raw_hook_error":
        with pytest.raises(Boom):
            with nested(model, factories):
                handle = model.blocks[1].mlp.register_forward_hook(
                    lambda *args: (_ for _ in ()).throw(Boom("raw hook")))
                try:
                    model(tokens)
                finally:
                    handle.remove()
    elif fault == "enter_error":
        with pytest.raises(ValueError, match="layer 99 does not exist"):
            with nested(model, factories) as stack:
                stack.enter_context(bidirectional(model, layers=[99]))
                pytest.fail("unreachable")
    elif fault == "enter_interrupt":
        @contextlib.contextmanager
        def interrupted(model):
            raise KeyboardInterrupt
            yield

        with pytest.raises(KeyboardInterrupt):
            with nested(model, factories) as stack:
                stack.enter_context(interrupted(model))
    else:  # pragma: no cover
        raise AssertionError(fault)


FAULTS = ("body_error", "body_interrupt", "hook_error", "hook_interrupt", "raw_hook_error",
          "enter_error", "enter_interrupt")


def check_restored(model, tokens, reference) -> None:
    expected, before = reference
    with torch.no_grad():
        assert torch.equal(model(tokens), expected), "outputs changed"
    assert_same(before, snapshot(model))


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(INTERVENTIONS))
def test_intervention_changes_outputs_and_restores(model, tokens, reference, name):
    """Sanity for the fault tests: each intervention does change the outputs (so "bit
    identical afterwards" is not vacuous) and restores them on a normal exit."""
    with torch.no_grad(), INTERVENTIONS[name](model):
        inside = model(tokens)
    assert not torch.equal(inside, reference[0])
    check_restored(model, tokens, reference)


@pytest.mark.parametrize("names", [(n,) for n in INTERVENTIONS] + PAIRS,
                         ids=lambda names: "+".join(names))
def test_faults_leave_model_unchanged(model, tokens, reference, names):
    for fault in FAULTS:
        inject(fault, model, tokens, [INTERVENTIONS[n] for n in names])
        check_restored(model, tokens, reference)


@pytest.mark.parametrize("exc", [Boom("half-way"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_bidirectional_failing_half_way_through_entry(model, tokens, reference, monkeypatch, exc):
    """Layer 0 is already switched (and its head mask hooked) when hooking layer 1 fails."""
    hook_point = model.blocks[1].attn.hook_attn_scores

    def failing(*args, **kwargs):
        raise exc

    monkeypatch.setattr(hook_point, "register_forward_hook", failing)
    with pytest.raises(type(exc)):
        with bidirectional(model, heads={0: [1], 1: [2]}):
            pytest.fail("unreachable")
    monkeypatch.undo()  # remove the patched method before comparing module attributes
    check_restored(model, tokens, reference)


def test_faults_on_a_local_window_model():
    """Sliding-window layers get an extra mask hook under the swap: restored as well."""
    model = tiny_rope_model(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=32, d_vocab=50,
                            seed=1, use_local_attn=True, attn_types=["local", "global"], window_size=4)
    tokens = torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    with torch.no_grad():
        reference = (model(tokens), snapshot(model))
    for window in ("symmetric", "none"):
        combos = (
            [lambda m, w=window: bidirectional(m, window=w)],
            [lambda m, w=window: bidirectional(m, heads={0: [1]}, window=w), INTERVENTIONS["bos_mean"]],
        )
        for factories in combos:
            for fault in FAULTS:
                inject(fault, model, tokens, factories)
                check_restored(model, tokens, reference)


def test_engine_failure_mid_run_restores_model(model, tokens, reference):
    """An error raised by a hook while the engine streams a batch under a pair of
    interventions: the engine's own hooks and the interventions are all undone."""
    from rope_leak.engine.run import run_statistics

    calls = {"n": 0}

    def fail_on_second_batch(activation, hook):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom("engine")

    def condition(m):
        return nested(m, (INTERVENTIONS["bidirectional_heads"], INTERVENTIONS["bos_noise"]))

    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", fail_on_second_batch)]):
            run_statistics(model, tokens.repeat(2, 1), conditions={"causal": lambda m: contextlib.nullcontext(m),
                                                                   "pair": condition},
                           batch_size=2, progress=False)
    check_restored(model, tokens, reference)

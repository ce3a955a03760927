"""Sweeps sharded over 4 (forced host) devices equal the same sweeps on one device.

The 4-device run happens in a subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=4
must be set before JAX starts); it imports this module and writes its results and the
number of devices each engine call really ran on to a .npz.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import reference
from jpatch.engine import execute as engine
from jpatch.methods import metrics
from jpatch import patching
from jpatch.model.convert import config_from_hf, from_hf_state_dict

V = reference.TINY["vocab_size"]
T = 7
N_DEVICES = 4


def inputs(batch):
    clean = reference.random_tokens(batch, T, V, seed=21)
    corrupted = clean.copy()
    corrupted[:, 1] = (clean[:, 1] + 13) % V
    corrupted[:, 4] = (clean[:, 4] + 29) % V
    rng = np.random.default_rng(batch)
    return clean, corrupted, rng.integers(0, V, batch), rng.integers(0, V, batch)


def mean_ld_callable(answers, contrasts):
    answers, contrasts, rows = jnp.asarray(answers), jnp.asarray(contrasts), jnp.arange(len(answers))

    def mean_ld(logits):  # a scalar metric: the whole batch must be reduced together
        return (logits[rows, -1, answers] - logits[rows, -1, contrasts]).mean()

    return mean_ld


def cases():
    """name -> (batch, sweep arguments)."""
    out = {}
    for batch in (8, 6):  # 6 prompts are padded to a multiple of 4 devices
        clean, corrupted, ans, con = inputs(batch)
        common = dict(clean=clean, corrupted=corrupted)
        out[f"resid_pre_ld_{batch}"] = (batch, dict(
            common, site="resid_pre", metric=metrics.logit_diff(ans, con, normalize=False), per_prompt=True))
        out[f"resid_pre_ld_mean_{batch}"] = (batch, dict(
            common, site="resid_pre", metric=metrics.logit_diff(ans, con, normalize=False)))
        out[f"z_kl_noise_{batch}"] = (batch, dict(
            common, site="z", metric=metrics.kl(), direction="noise", per_prompt=True))
        out[f"mlp_window_chunked_{batch}"] = (batch, dict(  # several prompt chunks, each sharded
            common, site="mlp_out", metric=metrics.probability(ans), window=2, per_prompt=True,
            memory_budget=1 << 20))
        out[f"scalar_callable_{batch}"] = (batch, dict(
            common, site="attn_out", metric=metrics.from_callable(mean_ld_callable(ans, con))))
    return out


def tiny_model():
    hf = reference.hf_model()
    return from_hf_state_dict(reference.hf_state_dict(hf), config_from_hf(hf.config))


def run_cases(model, devices):
    """Every case's result, and for each case the number of devices of each engine call."""
    used = []
    run_layout = engine.run_layout

    def recording(model, base, *args, **kwargs):
        used.append(len(base.final.sharding.device_set))
        return run_layout(model, base, *args, **kwargs)

    engine.run_layout = recording
    results, devices_used = {}, {}
    try:
        for name, (_, kw) in cases().items():
            used.clear()
            kw = dict(kw)
            results[name] = patching.sweep(model, kw.pop("clean"), kw.pop("corrupted"), kw.pop("site"),
                                           kw.pop("metric"), progress=False, devices=devices, **kw)
            devices_used[name] = np.array(used)
    finally:
        engine.run_layout = run_layout
    return results, devices_used


def child(path):
    """Runs in the subprocess."""
    assert len(jax.devices()) == N_DEVICES, jax.devices()
    results, used = run_cases(tiny_model(), None)  # devices=None: every local device
    np.savez(path, n_devices=len(jax.devices()), **{f"result/{k}": v for k, v in results.items()},
             **{f"used/{k}": v for k, v in used.items()})


def test_sharded_sweeps_match_one_device(tmp_path, jp_tiny):
    path = tmp_path / "sharded.npz"
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={N_DEVICES}",
               JAX_PLATFORMS="cpu")  # the suite's own flags kept (conftest)
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_sharding; test_sharding.child({str(path)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        single, used_single = run_cases(jp_tiny, jax.devices()[:1])  # meanwhile, on one device here
    finally:
        _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-5000:]
    sharded = np.load(path)
    assert int(sharded["n_devices"]) == N_DEVICES
    for name, (batch, kw) in cases().items():
        got, expected = sharded[f"result/{name}"], single[name]
        assert got.shape == expected.shape, name
        if kw.get("per_prompt"):
            assert got.shape[0] == batch, f"{name}: padding leaked into the result"
        assert np.isfinite(expected).all() and np.ptp(expected) > 1e-3, name
        err = float(np.abs(got - expected).max())
        assert err <= 1e-5, f"{name}: sharded vs one device, max abs error {err:.3g}"
        used = sharded[f"used/{name}"]
        assert (used_single[name] == 1).all()
        # Every sweep's patched runs use every device, a whole-batch metric's too (on padded prompt
        # chunks; it is scored on the real prompts after).
        assert len(used) and (used == N_DEVICES).all(), f"{name}: engine calls ran on {used.tolist()} devices"
        if name.startswith("mlp_window_chunked"):
            assert len(used) > 1, f"{name}: expected several prompt chunks"
        print(name, "engine calls on", used.tolist(), "devices; max abs error", err)

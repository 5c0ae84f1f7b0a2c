"""Surgery plans on stories260K: structure, the seed replica, sweeps, quality."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED
from sklearn.decomposition import PCA

from pcasurgery import LlamaModel
from pcasurgery.evaluate import Evaluator, default_eval_tokens
from pcasurgery.surgery import Surgery, plan, proj_name

MODEL = SHARED / "models" / "stories260K.bin"
pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} not found")


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return LlamaModel.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def eval_tokens(model) -> np.ndarray:
    text = (SHARED / "data" / "tinystories_sample.txt").read_text()
    story = text.split("<|endoftext|>")[0].strip()
    return np.asarray(model.tokenizer.encode(story, bos=False))


def snapshot(model):
    return {n: model.weights[n] for n in model.weights}


def test_plans_group_what_they_say(model):
    c = model.config
    g = plan(c, "separate")
    assert len(g) == 3 * c.num_hidden_layers and all(len(x.names) == 1 for x in g)
    g = plan(c, "shared-kv")
    kv = [x for x in g if x.kind == "k|v"]
    assert len(kv) == c.num_hidden_layers
    assert all(x.names == [proj_name(x.layers[0], "k"), proj_name(x.layers[0], "v")] for x in kv)
    for lpg, n in ((2, 3), (5, 1), (0, 1), (1, 5), (3, 2)):  # ceil(5 / g) bases
        assert len([x for x in plan(c, "shared-kv-xlayer", layers_per_group=lpg)
                    if x.kind == "k|v"]) == n
    assert [x.kind for x in plan(c, "seed")] == ["q"] * c.num_hidden_layers
    assert all(x.kind == "v" for x in plan(c, "shared-kv", proj="v") if x.kind != "q")
    with pytest.raises(ValueError, match="mode must be one of"):
        plan(c, "shared-qk")
    with pytest.raises(ValueError, match="proj must be a non-empty subset of q,k,v"):
        plan(c, "separate", proj=["o"])
    with pytest.raises(ValueError, match="layers_per_group must be an int >= 0"):
        plan(c, "shared-kv-xlayer", layers_per_group=-1)
    # the default is 0 (all layers) everywhere, as in the CLI: a Surgery in
    # shared-kv-xlayer mode is not silently shared-kv
    from pcasurgery.surgery import Surgery
    kv = [x for x in Surgery(model, "shared-kv-xlayer").groups if x.kind == "k|v"]
    assert len(kv) == 1 and kv[0].layers == list(range(c.num_hidden_layers))
    assert [x.label for x in plan(c, "shared-kv-xlayer")] == [
        x.label for x in plan(c, "shared-kv-xlayer", layers_per_group=0)]


def test_full_variance_equals_base_and_restore_is_bit_identical(model, eval_tokens):
    base = model.logits(eval_tokens[:64])
    before = snapshot(model)
    s = Surgery(model, "shared-kv").fit()
    s.apply(var=1.0)
    # rank-full centered reconstruction: the weights come back to ~1e-7, the
    # logits to float32 noise
    np.testing.assert_allclose(model.logits(eval_tokens[:64]), base, rtol=0, atol=1e-4)
    s.restore()
    after = snapshot(model)
    for n in before:
        assert after[n] is before[n] or np.array_equal(after[n], before[n])
        np.testing.assert_array_equal(after[n], before[n])
    np.testing.assert_array_equal(model.logits(eval_tokens[:64]), base)


def test_shared_kv_changes_k_and_v_with_one_fit_per_layer(model):
    before = snapshot(model)
    s = Surgery(model, "shared-kv").fit()
    assert s.fit_count == 2 * model.config.num_hidden_layers  # q + k|v per layer
    s.apply(var=0.5)
    for i in range(model.config.num_hidden_layers):
        for p in "qkv":
            n = proj_name(i, p)
            assert not np.allclose(model.weights[n], before[n]), n
    s.restore()


def test_seed_replicates_the_original_formulas(model):
    """An independent scikit-learn re-implementation of the original code:
    group by name.rsplit('.', 1)[0]; only a group holding both k and v would
    be shared (none ever does); q_proj alone is rebuilt as
    transform(W)[:, :k] @ components_[:k], without the mean."""
    before = snapshot(model)
    groups: dict[str, list[str]] = {}
    for name in before:
        if "self_attn" in name and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
            groups.setdefault(name.rsplit(".", 1)[0], []).append(name)
    assert all(len(v) == 1 for v in groups.values())  # never both k and v
    want = {}
    for key, names in groups.items():
        if key.endswith("q_proj"):
            W = before[names[0]].astype(np.float64)
            p = PCA(n_components=0.6, svd_solver="full").fit(W)
            k = p.n_components_
            want[names[0]] = p.transform(W)[:, :k] @ p.components_[:k]
    s = Surgery(model, "seed").fit()
    s.apply(var=0.6)
    for name, W in before.items():
        if name in want:
            # float32 PCA vs scikit-learn's float64 on the same float32 weights
            np.testing.assert_allclose(model.weights[name], want[name], rtol=0, atol=1e-5)
            # the mean really is missing: adding it back would differ
            assert not np.allclose(model.weights[name], before[name], atol=1e-3)
        else:
            np.testing.assert_array_equal(model.weights[name], W)  # K, V untouched
    s.restore()


def test_sweep_fits_each_group_once(model):
    s = Surgery(model, "separate").fit()
    n = s.fit_count
    assert n == 3 * model.config.num_hidden_layers
    for t in (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2):
        s.fit()  # a no-op once fitted
        s.apply(var=t)
    assert s.fit_count == n
    s.restore()


def test_kl_is_monotone_in_kept_variance(model, eval_tokens, report):
    ev = Evaluator(model, eval_tokens, n_ctx=256)
    assert ev.base_quality.kl == pytest.approx(0.0, abs=1e-9) and ev.base_quality.top1 == 1.0
    s = Surgery(model, "shared-kv").fit()
    thresholds = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
    kls = []
    for t in thresholds:
        s.apply(var=t)
        kls.append(ev.evaluate().kl)
    s.restore()
    report("stories260K shared-kv KL(base||surgered) at " +
           ", ".join(f"{t}: {k:.4f}" for t, k in zip(thresholds, kls)))
    # KL should not grow as more variance is kept; allow 10% of the
    # previous value (+1e-4 nats) of noise between neighbouring thresholds
    for a, b in zip(kls, kls[1:]):
        assert b <= a * 1.10 + 1e-4
    assert kls[-1] < kls[0] / 5


def test_budget_counts(model):
    c = model.config
    s = Surgery(model, "shared-kv").fit()
    ks = s.ks_for(rank=4)
    b = s.budget(ks)
    d, L, kvd = c.hidden_size, c.num_hidden_layers, c.kv_dim
    # per layer: q (64 rows) and k|v (2 * 32 rows), basis + coefficients + mean
    assert b["params_factored"] == L * ((4 * d + 64 * 4 + d) + (4 * d + 64 * 4 + d))
    assert b["params_dense"] == L * (64 * d + 64 * d)
    # a mode touching only some matrices counts the others at full size
    kv_only = Surgery(model, "shared-kv", proj="k,v").fit()
    assert kv_only.budget(kv_only.ks_for(rank=4))["params_factored"] == L * (
        64 * d + (4 * d + 64 * 4 + d))
    assert b["kv_latent_per_token"] == L * (4 + 1) and b["kv_dense_per_token"] == 2 * kvd * L
    sep = Surgery(model, "separate").fit()
    assert sep.budget(sep.ks_for(rank=4))["kv_latent_per_token"] == L * 2 * (4 + 1)
    seed = Surgery(model, "seed").fit()
    assert seed.budget(seed.ks_for(rank=4))["kv_ratio"] == 1.0  # K and V untouched


def test_default_eval_tokens_are_reproducible(model):
    a = default_eval_tokens(model, 100, seed=3)
    b = default_eval_tokens(model, 100, seed=3)
    assert len(a) == 100 and np.array_equal(a, b)


def test_fit_keep_limits_components_not_spectrum(model):
    full = Surgery(model, "shared-kv").fit()
    part = Surgery(model, "shared-kv").fit(keep=0.9)
    for gf, gp in zip(full.groups, part.groups):
        assert gp.pca.n_components_ == gf.pca.n_components_for(0.9) <= gf.pca.n_components_
        np.testing.assert_allclose(gp.pca.all_explained_variance_ratio_,
                                   gf.pca.all_explained_variance_ratio_, rtol=1e-10, atol=1e-13)
    assert part.ks_for(var=0.5) == full.ks_for(var=0.5)
    with pytest.raises(ValueError, match="components at this setting but the fit kept"):
        part.apply(var=0.99)
    ranked = Surgery(model, "separate").fit(keep=1000)  # clamped to each group's size
    assert all(g.pca.n_components_ == min(g.pca.max_components_, 1000) for g in ranked.groups)


def test_modes_share_common_fits(model):
    fits: dict = {}
    sep = Surgery(model, "separate", fits=fits).fit()
    kv = Surgery(model, "shared-kv", fits=fits).fit()
    L = model.config.num_hidden_layers
    assert sep.fit_count == 3 * L and kv.fit_count == L  # q reused, only k|v new
    base = model.logits([1, 5, 9])
    kv.apply(var=0.8)
    a = model.logits([1, 5, 9])
    kv.restore()
    alone = Surgery(model, "shared-kv").fit()
    alone.apply(var=0.8)
    np.testing.assert_array_equal(model.logits([1, 5, 9]), a)
    alone.restore()
    np.testing.assert_array_equal(model.logits([1, 5, 9]), base)

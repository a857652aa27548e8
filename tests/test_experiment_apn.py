"""The APN study: arms freeze what they claim to, the claim rules, LoRA, and a tiny end-to-end run."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch
from devices import HAS_CUDA, NO_CUDA

from routemem.cli import main
from routemem.experiments.apn import protocol as apn
from routemem.experiments.apn import claims as apn_claims
from routemem.experiments.apn import report as apn_report
from routemem.experiments.shared import adaptation
from routemem.experiments.shared.common import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from routemem.layers.lora import LoRALinear, add_lora
from routemem.models import TransformerLM

TINY = replace(apn.QUICK, d_model=32, n_head=2, seq_len=32, batch_size=8, pretrain_steps=12, adapt_steps=6,
               adapt_lrs=(1e-3, 3e-3), seeds=(0, 1), curve_points=2, curve_tokens=256, test_tokens=512,
               lora_rank=4, bf16=False, apn={"n_patches": 8, "rank": 4, "top_k": 2, "tau": 0.1, "load_balance": 0.01})


@pytest.fixture(scope="module")
def domains():
    return adaptation.load_domains("pydocs:pycode", None)


def _pretrained(kind: str, setting=TINY) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(adaptation.model_config(setting, kind))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("prototype_update", ["sgd", "ema"])
def test_apn_patches_arm_changes_only_patch_parameters(domains, prototype_update):
    setting = replace(TINY, apn={**TINY.apn, "prototype_update": prototype_update})
    base = _pretrained("apn", setting)
    before = _snapshot(base)
    model = adaptation.train_arm(base, "apn-patches", 3e-3, 0, domains, setting)
    after = _snapshot(model)
    patch_names = {"ffn.up", "ffn.gate_scale", "ffn.gate_bias"}
    frozen = [n for n in before if not any(n.endswith(p) for p in patch_names)]
    assert any("tok_emb" in n for n in frozen) and any("mixer" in n for n in frozen)
    assert any(n.endswith("ffn.prototypes") for n in frozen) and any(n.endswith("ffn.code") for n in frozen)
    for name in frozen:  # embeddings, attention, norms, prototypes, code V: bit-identical
        assert torch.equal(after[name], before[name]), f"{name} changed in the apn-patches arm"
    moved = [n for n in before if n not in frozen and not torch.equal(after[n], before[n])]
    assert moved, "the patch parameters did not train"
    assert all(torch.equal(before[n], p) for n, p in _snapshot(base).items()), "the pretrained model was modified"


def test_arms_train_the_parameters_they_name():
    dense, model_apn = _pretrained("dense"), _pretrained("apn")

    def trainable(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    all_dense = {n for n, _ in dense.named_parameters()}
    assert trainable(adaptation.prepare_arm(dense, "dense-global", TINY)) == all_dense
    assert trainable(adaptation.prepare_arm(model_apn, "apn-global", TINY)) == {n for n, _ in model_apn.named_parameters()}
    assert trainable(adaptation.prepare_arm(dense, "dense-ffn-only", TINY)) == {n for n in all_dense if ".ffn." in n}
    lora = trainable(adaptation.prepare_arm(dense, "dense-lora", TINY))
    assert lora and all("lora_" in n and ".ffn." in n for n in lora)
    patches = trainable(adaptation.prepare_arm(model_apn, "apn-patches", TINY))
    assert patches == {f"blocks.{i}.ffn.{p}" for i in range(TINY.n_layer) for p in ("up", "gate_scale", "gate_bias")}
    assert all(p.requires_grad for p in dense.parameters()), "prepare_arm must not touch the pretrained model"
    with pytest.raises(ValueError, match="unknown arm"):
        adaptation.prepare_arm(dense, "dense-everything", TINY)


def test_dense_ffn_matches_apn_parameter_count():
    dense, model_apn = _pretrained("dense"), _pretrained("apn")
    d_ffn, a_ffn = adaptation.ffn_size(dense), adaptation.ffn_size(model_apn)
    assert abs(d_ffn["ffn_params"] - a_ffn["ffn_params"]) <= 2 * TINY.d_model * TINY.n_layer  # one hidden unit
    assert a_ffn["ffn_active_per_token"] < a_ffn["ffn_params"]
    assert d_ffn["ffn_active_per_token"] == d_ffn["ffn_params"]


def test_lora_starts_as_identity_and_merges_exactly():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 4, bias=False))
    x = torch.randn(3, 6)
    expected = block(x)
    wrapped = add_lora(block, rank=2)
    assert len(wrapped) == 2 and isinstance(block[0], LoRALinear)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    assert {n for n, p in block.named_parameters() if p.requires_grad} == {
        "0.lora_a", "0.lora_b", "2.lora_a", "2.lora_b"}
    with torch.no_grad():
        block[0].lora_b.normal_()
    merged = torch.nn.functional.linear(x, block[0].merged_weight(), block[0].base.bias)
    torch.testing.assert_close(block[0](x), merged)


def test_changed_counts_lora_through_the_merged_weight():
    dense = _pretrained("dense")
    model = adaptation.prepare_arm(dense, "dense-lora", TINY)
    before = adaptation.effective_parameters(dense)
    assert set(adaptation.effective_parameters(model)) == set(before)
    assert adaptation.changed(before, model)["changed_fraction"] == 0.0
    with torch.no_grad():
        model.blocks[0].ffn.up.lora_b.fill_(0.1)
    weight = before["blocks.0.ffn.up.weight"]
    assert adaptation.changed(before, model)["changed_fraction"] == pytest.approx(weight.numel() / sum(
        v.numel() for v in before.values()))


def test_patches_changed_fraction_counts_patches():
    base = _pretrained("apn")
    model = adaptation.prepare_arm(base, "apn-patches", TINY)
    with torch.no_grad():
        model.blocks[0].ffn.up[3] += 1.0
    stats = adaptation.changed(adaptation.effective_parameters(base), model)
    assert stats["patches_changed_fraction"] == pytest.approx(0.5 / TINY.apn["n_patches"])


def _runs(apn_ppl, dense_ppl):
    return ([{"arm": "pretrain-apn", "seed": s, "metrics": {"a_test_ppl": v}} for s, v in enumerate(apn_ppl)]
            + [{"arm": "pretrain-dense", "seed": s, "metrics": {"a_test_ppl": v}} for s, v in enumerate(dense_ppl)])


@pytest.mark.parametrize("apn_ppl, dense_ppl, verdict", [
    ([4.5, 4.6, 4.55], [4.3, 4.35, 4.32], REPRODUCED),  # ratio ~1.05
    ([5.5, 5.6, 5.4], [4.3, 4.35, 4.32], NOT_REPRODUCED),  # ratio ~1.27
    ([4.3, 5.3], [4.3, 4.3], INCONCLUSIVE),  # ratio 1.12 +- 0.16 straddles 1.10
    ([4.5], [4.3], INCONCLUSIVE),  # one seed
])
def test_base_gap_rule(apn_ppl, dense_ppl, verdict):
    claim = apn_claims.base_gap_claim(_runs(apn_ppl, dense_ppl))
    assert claim["verdict"] == verdict, claim["why"]
    assert claim["measured"]["ratio"]["n"] == len(apn_ppl)


@pytest.mark.parametrize("ours, base, verdict", [
    ([10.0, 11.0], [28.0, 30.0], REPRODUCED),
    ([30.0, 31.0], [10.0, 11.0], NOT_REPRODUCED),
    ([10.0, 20.0], [14.0, 16.0], INCONCLUSIVE),
])
def test_after_adaptation_rule_is_directional_lower_is_better(ours, base, verdict):
    chosen = {"apn-patches": [{"seed": s, "metrics": {"a_test_ppl": v}} for s, v in enumerate(ours)],
              "dense-global": [{"seed": s, "metrics": {"a_test_ppl": v}} for s, v in enumerate(base)]}
    claim = apn_claims.after_adaptation_claim(chosen, "retention_ratio", "a_test_ppl", "d", (11.1, 29.4))
    assert claim["verdict"] == verdict
    assert claim["measured"]["ratio"]["mean"] == pytest.approx(sum(b / o for b, o in zip(base, ours)) / len(ours))


def test_tiny_study_end_to_end(tmp_path):
    results = apn.run(tmp_path, setting=TINY, pair="pydocs:pycode")
    study = tmp_path / "apn"
    assert {p.name for p in study.iterdir()} == {"runs", "results.json", "report.md", "forgetting_curves.png",
                                                 "patch_usage.png", "tradeoff.png"}
    saved = json.loads((study / "results.json").read_text())
    assert saved["study"] == "apn" and saved["mode"] == "custom"
    assert saved["data"] == {**saved["data"], "train": "pydocs", "shift": "pycode", "tokenizer": "bytes"}
    assert [c["id"] for c in saved["claims"]] == ["base_ppl_gap", "retention_ratio", "adaptation_ratio"]
    assert all(c["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) for c in saved["claims"])
    n_adapt = len(TINY.seeds) * len(TINY.arms) * len(TINY.adapt_lrs)
    assert len(saved["runs"]) == len(TINY.seeds) * 2 + n_adapt
    adapt_runs = [r for r in results["runs"] if not r["arm"].startswith("pretrain")]
    assert all([p["step"] for p in r["curve"]] == [0, 3, 6] for r in adapt_runs)
    usage = [r["patch_usage"] for r in results["runs"] if r["arm"] == "pretrain-apn"]
    assert all(0 <= o <= 1 + 1e-6 for u in usage for o in u["overlap"])
    assert all(sum(layer) == pytest.approx(1.0) for u in usage for layer in u["A"] + u["B"])
    report = (study / "report.md").read_text()
    assert "## Claims" in report and "apn-patches" in report and "dense-lora" in report
    assert "Retention against adaptation" in report
    assert set(saved["tradeoff"]["mean_ppl_by_arm_and_lr"]) == set(TINY.arms)
    assert len(saved["tradeoff"]["apn_patches_vs_dense_global"]) == len(TINY.seeds)
    # the paper's numbers beside ours, claims in plain words, the plot's seeds named
    assert all(c["statement"] in report for c in saved["claims"])
    assert "| paper: A test ppl |" in report and "| paper: A after |" in report and "| paper: B after |" in report
    assert "| apn-patches | 0.003" in report and "11.1 |" in report and "29.4 |" in report
    assert "— (our control)" in report
    assert "mean over seeds [0, 1]" in report


def _runs_without_timing(results: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(json.dumps(results["runs"]))]


def test_shards_give_the_runs_of_one_process(tmp_path):
    """One seed: two units (dense, apn). Compared exactly: each unit seeds what it draws, and every
    invocation here gives a run one CPU thread (tests/conftest.py)."""
    setting = replace(TINY, seeds=(0,), adapt_lrs=(3e-3,))
    kwargs = {"setting": setting, "pair": "pydocs:pycode", "device": "cpu"}
    alone = apn.run(tmp_path / "alone", **kwargs)
    for shard in ("0/2", "1/2"):
        done = apn.run(tmp_path / "sharded", shard=shard, **kwargs)
        assert (done["trained"], done["reused"]) == (1, 0)
        assert not (tmp_path / "sharded" / "apn" / "results.json").exists()
    assert sorted(p.name for p in (tmp_path / "sharded" / "apn" / "runs").iterdir()) == ["apn-seed0.json",
                                                                                      "dense-seed0.json"]
    assembled = apn.run(tmp_path / "sharded", **kwargs)
    assert assembled["runs_reused"] == 2
    assert _runs_without_timing(assembled) == _runs_without_timing(alone)
    assert [r["arm"] for r in alone["runs"]] == ["pretrain-dense", "pretrain-apn", *setting.arms]
    # --jobs sends units to spawned workers by pickling them (tests/test_reproduce_cli.py runs workers)
    units = apn.units(setting, "pydocs:pycode", None, torch.device("cpu"))
    assert pickle.loads(pickle.dumps(units)) == units


def test_a_cached_unit_is_not_reused_for_another_domain_pair(tmp_path):
    setting = replace(TINY, seeds=(0,), adapt_lrs=(3e-3,), arms=("dense-global",))
    apn.run(tmp_path, setting=setting, pair="pydocs:pycode", device="cpu", shard="0/2")
    assert apn.run(tmp_path, setting=setting, pair="pycode:pydocs", device="cpu", shard="0/2")["reused"] == 0


def test_dominated_finds_rates_better_on_both_domains():
    def run(arm, seed, lr, a, b):
        return {"arm": arm, "seed": seed, "lr": lr, "metrics": {"a_test_ppl": a, "b_test_ppl": b}}

    ours = [run("apn-patches", 0, 3e-3, 8.0, 5.0), run("apn-patches", 1, 3e-3, 8.0, 5.0)]
    runs = ours + [run("dense-global", 0, 3e-4, 7.9, 4.9), run("dense-global", 0, 3e-3, 11.0, 4.0),
                   run("dense-global", 1, 3e-4, 8.1, 4.9), run("dense-global", 1, 3e-3, 11.0, 4.0)]
    lines = apn_report.dominated({"runs": runs}, {"apn-patches": ours})
    assert lines == ["seed 0: dense-global at lr 0.0003 beats apn-patches (lr 0.003) on both",
                     "seed 1: no dense-global rate beats apn-patches (lr 0.003) on both"]
    means = apn_report.by_rate({"runs": runs})
    assert means["dense-global"][3e-4] == {"a": pytest.approx(8.0), "b": pytest.approx(4.9)}


def test_default_pair_without_data_is_builtin(monkeypatch, tmp_path):
    monkeypatch.delenv("ROUTEMEM_DATA", raising=False)
    assert adaptation.default_pair(None) == "pydocs:pycode"
    assert adaptation.default_pair(str(tmp_path)) == "pydocs:pycode"  # a folder without the files


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "apn", "--pair", "pydocs"], "pair must be 'A:B'"),
    (["reproduce", "apn", "--pair", "pydocs:nosuchcorpus"], "unknown corpus"),
    (["reproduce", "palimpsa", "--pair", "pydocs:pycode"], "--pair applies to the apn study only"),
])
def test_cli_rejects_bad_pair(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "apn").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_tiny_study_trains_on_cuda(tmp_path):
    """On a GPU the models, batches and evaluation live there (mode="auto" picks the grouped APN
    form, not the CPU kernel), and bf16 autocast is used where the GPU has it."""
    setting = replace(TINY, seeds=(0,), adapt_lrs=(3e-3,), bf16=True)
    results = apn.run(tmp_path, setting=setting, pair="pydocs:pycode", device="cuda")
    assert results["env"]["device"] == "cuda" and results["env"]["gpu"]
    assert results["execution"]["bf16"] == torch.cuda.is_bf16_supported()
    assert all(r["metrics"]["a_test_ppl"] > 1 for r in results["runs"] if "metrics" in r)

"""The rank allocator against PEFT's RankAllocator, and its schedule/mask rules against references."""

import copy

import pytest
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import get_peft_model

from adalora import AdaLoraConfig, RankAllocator, budget_schedule, inject_adapters, keep_mask
from tests.conftest import tiny_llama

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def _pair(init_r, target_r, tinit, tfinal, deltaT, total, beta1=0.85, beta2=0.85):
    base = tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), PeftAdaLoraConfig(
        init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=deltaT, total_step=total,
        beta1=beta1, beta2=beta2, target_modules=list(TARGETS), lora_alpha=8))
    ours = inject_adapters(base, AdaLoraConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal,
                                               deltaT=deltaT, total_step=total, beta1=beta1, beta2=beta2,
                                               target_modules=TARGETS))
    peft_layers = {}
    for name, module in peft_model.base_model.model.named_modules():
        if name in ours.layers:
            peft_layers[name] = module
    assert set(peft_layers) == set(ours.layers)
    return peft_model, ours, peft_layers


def _set_same(ours, peft_layers, gen):
    """Identical random values and gradients on both sides: P = lora_B, lam = lora_E, Q = lora_A."""
    with torch.no_grad():
        for path, layer in ours.layers.items():
            peft = peft_layers[path]
            for ours_p, peft_p in ((layer.P, peft.lora_B["default"]), (layer.Q, peft.lora_A["default"])):
                ours_p.copy_(torch.randn(ours_p.shape, generator=gen))
                peft_p.copy_(ours_p)
                ours_p.grad = torch.randn(ours_p.shape, generator=gen)
                peft_p.grad = ours_p.grad.clone()
            # keep already-masked lam at zero so the two sides stay comparable through masking
            new = torch.randn(layer.lam.shape, generator=gen) * (layer.lam != 0).float() \
                if layer.lam.abs().sum() > 0 else torch.randn(layer.lam.shape, generator=gen)
            layer.lam.copy_(new)
            peft.lora_E["default"].copy_(new.view(-1, 1))
            layer.lam.grad = torch.randn(layer.lam.shape, generator=gen)
            peft.lora_E["default"].grad = layer.lam.grad.view(-1, 1).clone()


SCHEDULES = [
    # init_r, target_r, tinit, tfinal, deltaT, total
    (4, 2, 2, 4, 1, 20),
    (6, 3, 0, 3, 3, 16),
    (4, 1, 3, 0, 2, 14),
]


@pytest.mark.parametrize("init_r,target_r,tinit,tfinal,deltaT,total", SCHEDULES)
def test_scores_budget_and_masks_equal_peft(init_r, target_r, tinit, tfinal, deltaT, total):
    peft_model, ours, peft_layers = _pair(init_r, target_r, tinit, tfinal, deltaT, total)
    allocator = RankAllocator(ours)
    peft_alloc = peft_model.base_model.rankallocator
    assert allocator.init_budget == peft_alloc.init_bgt
    assert allocator.target_budget == peft_alloc.target_bgt
    gen = torch.Generator().manual_seed(1)
    for step in range(total):
        _set_same(ours, peft_layers, gen)
        peft_model.base_model.update_and_allocate(step)
        budget = allocator.step(step)
        if step < total - tfinal:
            assert budget == peft_alloc.budget_schedule(step)[0]
        for path, layer in ours.layers.items():
            peft = peft_layers[path]
            torch.testing.assert_close(layer.lam, peft.lora_E["default"].view(-1), rtol=0, atol=0)
            key = f"{path}.lora_A.default"
            if key in peft_alloc.exp_avg_ipt:
                torch.testing.assert_close(allocator.ema_ipt[f"{path}.Q"], peft_alloc.exp_avg_ipt[key])
                torch.testing.assert_close(allocator.ema_unc[f"{path}.Q"], peft_alloc.exp_avg_unc[key])
        pattern = peft_model.peft_config["default"].rank_pattern
        if pattern:
            for path in ours.layers:
                peft_mask = pattern.get(f"{path}.lora_E.default", pattern.get(f"{path}.lora_E"))
                assert allocator.masks[path].tolist() == peft_mask, (step, path)
    reached = allocator.reached()
    if tfinal > 0:
        assert reached["triplets"] <= allocator.target_budget
    assert 0 < reached["triplets"] < allocator.init_budget


def naive_schedule(t, b0, bT, tinit, tfinal, T, dT):
    if t <= tinit:
        return b0, False
    if t > T - tfinal:
        return bT, True
    frac = (t - tinit) / (T - tfinal - tinit)
    return int(bT + (b0 - bT) * (1 - frac) ** 3), t % dT == 0


@pytest.mark.parametrize("b0,bT,tinit,tfinal,T,dT", [(48, 24, 0, 0, 10, 1), (100, 10, 5, 10, 50, 4), (7, 0, 1, 1, 9, 2)])
def test_budget_schedule_matches_formula(b0, bT, tinit, tfinal, T, dT):
    for t in range(T + 2):
        assert budget_schedule(t, b0, bT, tinit, tfinal, T, dT) == naive_schedule(t, b0, bT, tinit, tfinal, T, dT)
    assert budget_schedule(T - tfinal, b0, bT, tinit, tfinal, T, dT)[0] == bT


def naive_keep(scores, costs, budget):
    """Greedy by descending score; a tie at the first excluded score drops every tied entry."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    total, kept = 0, []
    for i in order:
        if total + costs[i] > budget:
            cut = scores[i]
            return [s > cut for s in scores]
        total += costs[i]
        kept.append(i)
    return [True] * len(scores)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("unit", [True, False])
def test_keep_mask_matches_greedy_reference(seed, unit):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (30,), generator=gen).float()  # many ties on purpose
    costs = torch.ones(30) if unit else torch.randint(1, 5, (30,), generator=gen).float()
    for budget in (0, 1, 7, 15, 29, 30, 200):
        got = keep_mask(scores, costs, budget).tolist()
        assert got == naive_keep(scores.tolist(), costs.tolist(), budget)
        assert float(costs[torch.tensor(got)].sum()) <= budget


def test_keep_mask_unit_costs_equal_peft_kthvalue_rule():
    scores = torch.rand(40, generator=torch.Generator().manual_seed(0))
    for budget in range(1, 40):
        threshold = torch.kthvalue(scores, k=40 - budget)[0]
        assert keep_mask(scores, torch.ones(40), budget).tolist() == (scores > threshold).tolist()


def test_param_budget_counts_parameters():
    model = tiny_llama()
    cfg = AdaLoraConfig(init_r=4, budget=600, tinit=0, tfinal=2, deltaT=1, total_step=8, target_modules=TARGETS)
    adapters = inject_adapters(model, cfg)
    allocator = RankAllocator(adapters)
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        for layer in adapters.layers.values():
            for p in (layer.P, layer.lam, layer.Q):
                p.grad = torch.randn(p.shape, generator=gen)
        with torch.no_grad():
            for layer in adapters.layers.values():
                layer.lam.add_(torch.randn(layer.lam.shape, generator=gen))
        allocator.step(step)
    reached = allocator.reached()
    costs = adapters.triplet_costs()
    assert reached["params"] == sum(reached["ranks"][p] * costs[p] for p in costs)
    assert 600 - max(costs.values()) < reached["params"] <= 600


def test_state_dict_round_trip_continues_identically():
    def run(split):
        model = tiny_llama()
        cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=12, target_modules=TARGETS)
        adapters = inject_adapters(model, cfg)
        allocator = RankAllocator(adapters)
        gen = torch.Generator().manual_seed(3)
        for step in range(12):
            if step == split:
                state = allocator.state_dict()
                allocator = RankAllocator(adapters)
                allocator.load_state_dict(state)
            for layer in adapters.layers.values():
                for p in (layer.P, layer.lam, layer.Q):
                    p.grad = torch.randn(p.shape, generator=gen)
                with torch.no_grad():
                    layer.lam.add_(torch.randn(layer.lam.shape, generator=gen))
            allocator.step(step)
        return {k: v.tolist() for k, v in allocator.masks.items()}

    assert run(split=-1) == run(split=6)
